"""Benchmarks: recipes that turn a dataset into a stream of tasks."""

from cl_runner.benchmarks import mnist  # noqa: F401  (registers the MNIST-family benchmarks)
from cl_runner.benchmarks import cifar  # noqa: F401  (Split CIFAR-10/100, Split Tiny ImageNet)
from cl_runner.benchmarks.builder import build_stream  # noqa: F401
from cl_runner.benchmarks.stream import Stream, Task  # noqa: F401
