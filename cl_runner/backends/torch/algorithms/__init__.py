"""PyTorch implementations of the algorithms, one file each."""

from cl_runner.backends.torch.algorithms import ewc, joint  # noqa: F401
