"""iCaRL's and GEM's reference behaviours, computed by hand, on both backends.

* iCaRL's loss reduction: the original code averages the sigmoid binary cross-entropy over every
  output unit (srebuffi/iCaRL main_cifar_100_theano.py:66-67), Mammoth's 2020 code over the units
  of the classes seen so far (aimagelab/mammoth models/icarl.py at 5dc82be, lines 90-102).
* iCaRL's class means: L2-normalised or raw features, and the original's average with the
  exemplars' horizontal flips (main_cifar_100_theano.py:259-271); the nearest-mean rule and
  herding on raw features (Mammoth 2020).
* GEM's quadratic program: 1e-3 * I is always added to G G^T (facebookresearch/
  GradientEpisodicMemory model/gem.py:84).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cl_runner import catalog
from cl_runner.algorithms.replay import gem_dual
from cl_runner.benchmarks.stream import Stream, Task
from cl_runner.config import validate_config
from cl_runner.errors import ConfigError

from test_algorithms import make_learner

torch_backend = catalog.load_backend("torch")
from cl_runner.backends.torch.algorithms import gem as tgem  # noqa: E402
from cl_runner.backends.torch.algorithms import icarl as ticarl  # noqa: E402
from cl_runner.backends.torch.herding import ExemplarMemory as TorchExemplars  # noqa: E402

LN3 = math.log(3.0)


def jax_modules():
    """The JAX backend's modules, or a skip where JAX is not installed."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax")
    pytest.importorskip("optax")
    backend = catalog.load_backend("jax")
    from cl_runner.backends.jax.algorithms import gem as jgem
    from cl_runner.backends.jax.algorithms import icarl as jicarl
    from cl_runner.backends.jax.herding import ExemplarMemory as JaxExemplars
    return jax, backend, jgem, jicarl, JaxExemplars


def jax_learner(stream, name, algo, benchmark=None, backbone=None):
    _, backend, *_ = jax_modules()
    cfg = {"backend": {"name": "jax"}, "algo": {"name": name, **algo},
           "backbone": {"width": 8, "n_hidden_layers": 1, **(backbone or {})},
           "benchmark": {"batch_size": 8, "name": "splitmnist", **(benchmark or {})}}
    return backend.build_learner(validate_config(cfg)[0], stream, backend.resolve_device("cpu"), 0)


def one_class_per_task(num_tasks=3, side=4) -> Stream:
    """Class-IL: task t brings class t alone, so after task 0 unit 0 is old, unit 1 new, unit 2 unseen."""
    rng = np.random.default_rng(0)
    tasks = [Task(id=t, train_x=rng.integers(0, 256, (6, 1, side, side), dtype=np.uint8),
                  train_y=np.full(6, t, np.int64),
                  test_x=rng.integers(0, 256, (4, 1, side, side), dtype=np.uint8),
                  test_y=np.full(4, t, np.int64), classes=np.array([t]))
             for t in range(num_tasks)]
    return Stream(name="synthetic", scenario="class_il", tasks=tasks, num_outputs=num_tasks,
                  input_shape=(1, side, side), mean=(0.5,), std=(0.25,))


# -- iCaRL's loss ------------------------------------------------------------------------------------
#
# Task 1 of one_class_per_task: unit 0 old (distillation target q = sigmoid of the previous
# model's output, here a model with every parameter 0: q = 1/2), unit 1 new, unit 2 not seen yet.
#   sample A, label 1, logits (0, ln 3, -ln 3): p = (1/2, 3/4, 1/4), targets (1/2, 1, 0)
#     terms: ln 2 = 0.693147, -ln 3/4 = 0.287682, -ln 3/4 = 0.287682
#   sample B, label 0 (an exemplar), logits (ln 3, ln 3, 0): p = (3/4, 3/4, 1/2), targets (1/2, 0, 0)
#     terms: -(ln 3/4 + ln 1/4)/2 = 0.836988, -ln 1/4 = 1.386294, ln 2 = 0.693147
# original (all 3 units): A 1.268511 / 3 = 0.422837, B 2.916429 / 3 = 0.972143; mean 0.697490.
# mammoth (seen units 0, 1): A 0.980829 / 2 = 0.490415, B 2.223282 / 2 = 1.111641; mean 0.801028.
LOGITS = [[0.0, LN3, -LN3], [LN3, LN3, 0.0]]
LABELS = [1, 0]
HAND_LOSS = {"original": 0.697490, "mammoth": 0.801028}


@pytest.mark.parametrize("reduction", ["original", "mammoth"])
def test_icarl_loss_reduction_by_hand_torch(reduction):
    stream = one_class_per_task()
    learner = make_learner(stream, "icarl", algo={"mem_size": 6, "loss_reduction": reduction},
                           benchmark={"name": "splitmnist"})
    learner.on_before_task(stream.tasks[1])
    part = learner.parts[0]
    with torch.no_grad():
        for p in part.teacher.parameters():
            p.zero_()
    logits, y = torch.tensor(LOGITS), torch.tensor(LABELS)
    x = learner.to_input(stream.tasks[1].train_x[:2])
    loss = learner.criterion(logits, y, None) + part.extra_loss(x, y, logits)
    assert float(loss) == pytest.approx(HAND_LOSS[reduction], abs=2e-6)


@pytest.mark.parametrize("reduction", ["original", "mammoth"])
def test_icarl_loss_reduction_by_hand_jax(reduction):
    jax, *_ = jax_modules()
    import jax.numpy as jnp

    stream = one_class_per_task()
    learner = jax_learner(stream, "icarl", {"mem_size": 6, "loss_reduction": reduction})
    learner.on_before_task(stream.tasks[1])
    part = learner.parts[0]
    part.state = {**part.state, "teacher": jax.tree_util.tree_map(jnp.zeros_like, part.state["teacher"])}
    x = learner.to_input(stream.tasks[1].train_x[:2])
    loss = learner.loss_from_logits(learner.params, (part.state,), x, jnp.asarray(LABELS), None, None,
                                    learner.mask_table, jnp.asarray(LOGITS, jnp.float32))
    assert float(loss) == pytest.approx(HAND_LOSS[reduction], abs=2e-6)


def test_icarl_first_task_and_a_growing_head_average_over_the_units_that_exist():
    """Task 0, original: the 3 units (label 0 for A: targets (1, 0, 0)); mammoth: unit 0 alone.
    With an incremental head only the seen units exist, so ``original`` averages over them too."""
    stream = one_class_per_task()
    logits, y = torch.tensor([[LN3, 0.0, -LN3]]), torch.tensor([0])
    # terms: -ln 3/4 = 0.287682, ln 2 = 0.693147, -ln 3/4 = 0.287682
    for algo, backbone, expected in [({"loss_reduction": "original"}, {}, 1.268511 / 3),
                                     ({"loss_reduction": "mammoth"}, {}, 0.287682),
                                     ({"loss_reduction": "original"}, {"head": "incremental"}, 0.287682)]:
        learner = make_learner(stream, "icarl", algo={"mem_size": 6, **algo}, backbone=backbone,
                               benchmark={"name": "splitmnist"})
        learner.on_before_task(stream.tasks[0])
        assert learner.parts[0].extra_loss(None, y, logits) is None
        assert float(learner.criterion(logits, y, None)) == pytest.approx(expected, abs=2e-6)


def test_icarl_first_task_and_a_growing_head_average_over_the_units_that_exist_jax():
    """The JAX backend's loss on the same cases (its head keeps every unit allocated and masks
    those of tasks not started, so the averaging has to follow the seen units by itself)."""
    jax, *_ = jax_modules()
    import jax.numpy as jnp

    stream = one_class_per_task()
    logits, y = jnp.asarray([[LN3, 0.0, -LN3]], jnp.float32), jnp.asarray([0])
    for algo, backbone, expected in [({"loss_reduction": "original"}, {}, 1.268511 / 3),
                                     ({"loss_reduction": "mammoth"}, {}, 0.287682),
                                     ({"loss_reduction": "original"}, {"head": "incremental"}, 0.287682)]:
        learner = jax_learner(stream, "icarl", {"mem_size": 6, **algo}, backbone=backbone)
        learner.on_before_task(stream.tasks[0])
        part = learner.parts[0]
        x = learner.to_input(stream.tasks[0].train_x[:1])
        loss = learner.loss_from_logits(learner.params, (part.state,), x, y, None, None,
                                        learner.mask_table, logits)
        assert float(loss) == pytest.approx(expected, abs=2e-6), (algo, backbone)


def test_icarl_loss_reduction_is_checked():
    with pytest.raises(ConfigError, match="'algo.loss_reduction': 'sum' is not one of original, mammoth"):
        validate_config({"algo": {"name": "icarl", "loss_reduction": "sum"}, "benchmark": {"name": "splitmnist"}})


# -- iCaRL's class means -----------------------------------------------------------------------------
#
# Two exemplars of 1 x 1 x 2 pixels, (3, 4) and (0, 5), with phi(image) = its two pixel values;
# the horizontal flips are (4, 3) and (5, 0).
#   normalised, no flip: mean of (0.6, 0.8), (0, 1) = (0.3, 0.9), normalised (0.316228, 0.948683)
#   normalised, flip:    flips' mean (0.9, 0.3); average (0.6, 0.6), normalised (0.707107, 0.707107)
#   raw, no flip:        (1.5, 4.5)
#   raw, flip:           average of (1.5, 4.5) and (4.5, 1.5) = (3, 3)
EXEMPLARS = np.array([[[[3, 4]]], [[[0, 5]]]], np.uint8)
HAND_MEANS = {(True, False): [0.316228, 0.948683], (True, True): [0.707107, 0.707107],
              (False, False): [1.5, 4.5], (False, True): [3.0, 3.0]}


def pixel_features(images):
    return np.asarray(images, np.float32)[:, 0, 0, :]


@pytest.mark.parametrize("normalize, flip", list(HAND_MEANS))
def test_icarl_class_mean_by_hand_torch(normalize, flip):
    stream = one_class_per_task()
    learner = make_learner(stream, "icarl", algo={"mem_size": 6, "normalize_features": normalize,
                                                  "flip_means": flip}, benchmark={"name": "splitmnist"})
    learner.image_features = lambda images: torch.from_numpy(pixel_features(images))
    np.testing.assert_allclose(learner.exemplar_mean(EXEMPLARS).numpy(), HAND_MEANS[normalize, flip], atol=1e-6)


@pytest.mark.parametrize("normalize, flip", list(HAND_MEANS))
def test_icarl_class_mean_by_hand_jax(normalize, flip):
    stream = one_class_per_task()
    learner = jax_learner(stream, "icarl", {"mem_size": 6, "normalize_features": normalize, "flip_means": flip})
    learner.image_features = pixel_features
    np.testing.assert_allclose(learner.exemplar_mean(EXEMPLARS), HAND_MEANS[normalize, flip], atol=1e-6)


def test_icarl_flip_means_follows_the_augmentation_when_unset():
    stream = one_class_per_task()
    for augment, flip, expected in [(False, None, False), (True, None, True), (True, False, False),
                                    (False, True, True)]:
        learner = make_learner(stream, "icarl", algo={"mem_size": 6, "flip_means": flip},
                               benchmark={"name": "splitmnist", "augment": augment})
        assert learner.flip_means is expected


# -- nearest mean and herding on raw features -------------------------------------------------------
#
# Means (1, 0) and (3, 3), feature (2, 2). Raw: distances sqrt(5) = 2.236 and sqrt(2) = 1.414, so
# class 1. Normalised feature (0.707, 0.707): distances 0.765 and 3.243, so class 0.
NME_MEANS = [[1.0, 0.0], [3.0, 3.0]]
NME_FEATURE = [[2.0, 2.0]]


def test_nearest_mean_raw_and_normalised_by_hand_both_backends():
    allowed = torch.tensor([True, True])
    feats, means = torch.tensor(NME_FEATURE), torch.tensor(NME_MEANS)
    assert ticarl.nearest_mean(feats, means, allowed, normalize=False).tolist() == [1]
    assert ticarl.nearest_mean(feats, means, allowed, normalize=True).tolist() == [0]
    _, _, _, jicarl, _ = jax_modules()
    import jax.numpy as jnp
    args = jnp.asarray(NME_FEATURE), jnp.asarray(NME_MEANS), jnp.asarray([True, True])
    assert np.asarray(jicarl.nearest_mean(*args, normalize=False)).tolist() == [1]
    assert np.asarray(jicarl.nearest_mean(*args, normalize=True)).tolist() == [0]


# Herding by hand on raw features: mean (0.2, 0.3); the order is (0, 2, 1, 3, 4) (worked out in
# test_algorithms_replay2.test_herding_picks_the_exemplar_that_keeps_the_running_mean_closest).
# Normalised, (2, 0) and (-1, 0) become (1, 0) and (-1, 0), (0, 3) and (0, -1.5) become (0, +-1):
# mean (0, 0), so the first choice is p0 ((0, 0), distance 0) and then a pair of opposite points.
HERD_POINTS = np.array([[0.0, 0.0], [2.0, 0.0], [-1.0, 0.0], [0.0, 3.0], [0.0, -1.5]], np.float32)


def test_herding_on_raw_features_both_backends():
    _, _, _, _, JaxExemplars = jax_modules()
    for memory in (TorchExemplars(10, "herding", normalize=False), JaxExemplars(10, "herding", normalize=False)):
        feats = torch.from_numpy(HERD_POINTS) if isinstance(memory, TorchExemplars) else HERD_POINTS
        assert np.asarray(memory.select(feats, 5)).tolist() == [0, 2, 1, 3, 4]
    for memory in (TorchExemplars(10, "herding"), JaxExemplars(10, "herding")):
        feats = torch.from_numpy(HERD_POINTS) if isinstance(memory, TorchExemplars) else HERD_POINTS
        order = np.asarray(memory.select(feats, 3)).tolist()
        assert order[0] == 0 and sorted(order[1:]) in ([1, 2], [3, 4]), order


# -- GEM's quadratic program with eps ----------------------------------------------------------------
#
# g1 = (1, 0), g2 = (1, 1), g = (-3, 1): <g, g1> = -3, <g, g2> = -2 (both violated).
# P = G G^T = [[1, 1], [1, 2]], q = G g = (-3, -2), eps = 1e-3, margin 0.5:
#   min 1/2 v^T (P + eps I) v + q^T v, v >= 0.5. Without the bounds v = (P + eps I)^-1 (3, 2)
#   = (4.003, -0.998) / 1.003001, so v2 sits at its bound 0.5; then 1.001 v1 + 0.5 - 3 = 0 gives
#   v1 = 2.5 / 1.001 = 2.497502 (>= 0.5), and v2's multiplier v1 + 2.001 * 0.5 - 2 = 1.498002 >= 0.
#   g~ = g + v1 g1 + v2 g2 = (-3 + 2.497502 + 0.5, 1 + 0.5) = (-0.002498, 1.5):
#   <g~, g1> = -eps v1 (the constraint the reference meets up to eps), <g~, g2> = 1.497502.
# Without eps: v1 = 2.5 and g~ = (0, 1.5).
GEM_G = [[1.0, 0.0], [1.0, 1.0]]
GEM_g = [-3.0, 1.0]
GEM_V = {1e-3: [2.5 / 1.001, 0.5], 0.0: [2.5, 0.5]}
GEM_NEW = {1e-3: [-3.0 + 2.5 / 1.001 + 0.5, 1.5], 0.0: [0.0, 1.5]}


@pytest.mark.parametrize("eps", [1e-3, 0.0])
def test_gem_dual_and_projection_with_eps_by_hand_torch(eps):
    G = np.array(GEM_G)
    v = gem_dual(G @ G.T, G @ np.array(GEM_g), 0.5, eps)
    np.testing.assert_allclose(v, GEM_V[eps], rtol=0, atol=1e-9)
    new, projected = tgem.gem_project(torch.tensor(GEM_g, dtype=torch.float64),
                                      torch.tensor(GEM_G, dtype=torch.float64), 0.5, eps)
    assert projected
    np.testing.assert_allclose(new.numpy(), GEM_NEW[eps], rtol=0, atol=1e-9)


def test_gem_eps_is_the_default_and_reaches_the_learner():
    assert np.allclose(gem_dual(np.array(GEM_G) @ np.array(GEM_G).T, np.array([-3.0, -2.0]), 0.5), GEM_V[1e-3])
    stream = one_class_per_task()
    assert make_learner(stream, "gem", algo={"mem_per_task": 2}).parts[0].eps == 1e-3
    assert make_learner(stream, "gem", algo={"mem_per_task": 2, "qp_eps": 0.0}).parts[0].eps == 0.0
    with pytest.raises(ConfigError, match="'algo.qp_eps' must be >= 0"):
        validate_config({"algo": {"name": "gem", "qp_eps": -1.0}})


@pytest.mark.parametrize("eps", [1e-3, 0.0])
def test_gem_projection_with_eps_by_hand_jax(eps):
    jax, _, jgem, _, _ = jax_modules()
    import jax.numpy as jnp

    # A third row for a task that is not past yet: ignored.
    G = {"w": jnp.asarray(GEM_G + [[-5.0, -5.0]], jnp.float32)}
    g = {"w": jnp.asarray(GEM_g, jnp.float32)}
    active = jnp.asarray([True, True, False])
    new, projected = jax.jit(jgem.gem_project, static_argnums=(3, 4))(g, G, active, 0.5, eps)
    assert bool(projected)
    np.testing.assert_allclose(np.asarray(new["w"]), GEM_NEW[eps], rtol=0, atol=1e-6)
    stream = one_class_per_task()
    assert jax_learner(stream, "gem", {"mem_per_task": 2, "qp_eps": eps}, {"name": "permutedmnist"}) \
        .parts[0].eps == eps
