"""JAX implementations of the algorithms, one file each."""

from cl_runner.backends.jax.algorithms import ewc, joint  # noqa: F401
from cl_runner.backends.jax.algorithms import (  # noqa: F401
    agem, der, derpp, er, ewc_online, lwf, mas, si,
)
