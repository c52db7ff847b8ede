"""PyTorch implementations of the algorithms, one file each."""

from cl_runner.backends.torch.algorithms import (  # noqa: F401
    agem, der, derpp, er, ewc, ewc_online, joint, lwf, mas, si)
from cl_runner.backends.torch.algorithms import gdumb, gem, icarl  # noqa: F401,E402
from cl_runner.backends.torch.algorithms import lamaml, mcsgd  # noqa: F401,E402
from cl_runner.backends.torch.algorithms import kcl, lfl, pnn, stable_sgd  # noqa: F401,E402
from cl_runner.backends.torch.algorithms import naive_rehearsal  # noqa: F401,E402
