"""JAX implementations of the algorithms, one file each."""

from cl_runner.backends.jax.algorithms import ewc, joint  # noqa: F401
from cl_runner.backends.jax.algorithms import (  # noqa: F401
    agem, der, derpp, er, ewc_online, lwf, mas, si,
)
from cl_runner.backends.jax.algorithms import gdumb, gem, icarl, lfl, stable_sgd  # noqa: F401
from cl_runner.backends.jax.algorithms import mcsgd  # noqa: F401
from cl_runner.backends.jax.algorithms import lamaml  # noqa: F401
from cl_runner.backends.jax.algorithms import naive_rehearsal  # noqa: F401,E402
from cl_runner.backends.jax.algorithms import pnn  # noqa: F401
from cl_runner.backends.jax.algorithms import kcl  # noqa: F401
