"""JAX implementations of the algorithms, one file each."""

from cl_runner.backends.jax.algorithms import ewc, joint  # noqa: F401
