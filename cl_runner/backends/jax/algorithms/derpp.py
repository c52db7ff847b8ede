"""DER++ (Buzzega et al. 2020, NeurIPS) on the JAX backend: DER's logit matching on one memory
batch plus beta * cross-entropy at the stored labels on a second, independently drawn memory
batch. See der.py.
"""

from __future__ import annotations

from cl_runner.backends.jax.algorithms.der import DERPart
from cl_runner.backends.jax.learner import JaxLearner
from cl_runner.registry import ALGORITHMS


class DERPPPart(DERPart):
    use_labels = True


@ALGORITHMS.register("derpp", backend="jax")
class DERPP(JaxLearner):
    part_classes = (DERPPPart,)
