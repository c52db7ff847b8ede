"""PyTorch implementations of the algorithms, one file each."""

from cl_runner.backends.torch.algorithms import (  # noqa: F401
    agem, der, derpp, er, ewc, ewc_online, joint, lwf, mas, si)
