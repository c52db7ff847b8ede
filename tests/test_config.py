"""Config validation: unknown keys, wrong types, SequeL-format quirks, plugins, and conf/."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from cl_runner import resources
from cl_runner.config import validate_config
from cl_runner.config.schema import AlgoConfig, RunConfig
from cl_runner.errors import ConfigError
from cl_runner.registry import ALGORITHMS

REPO = Path(__file__).resolve().parent.parent
CONF = resources.CONF_DIR
# The SequeL-format files, in the offline copy beside the checkout.
SEQUEL = (REPO.parent / "shared" / "sequel_configs").resolve()


def error_of(cfg: dict) -> str:
    with pytest.raises(ConfigError) as ei:
        validate_config(cfg)
    return str(ei.value)


# -- unknown keys -------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg, key, near", [
    ({"benchmark": {"num_task": 3}}, "benchmark.num_task", "benchmark.num_tasks"),
    ({"algo": {"name": "ewc", "ewc_lambdaa": 5}}, "algo.ewc_lambdaa", "algo.ewc_lambda"),
    ({"optimizer": {"momentun": 0.9}}, "optimizer.momentun", "optimizer.momentum"),
    ({"training": {"epochs_per_tsk": 2}}, "training.epochs_per_tsk", "training.epochs_per_task"),
    ({"seeed": 1}, "seeed", "seed"),
])
def test_unknown_key_names_key_and_nearest(cfg, key, near):
    msg = error_of(cfg)
    assert f"unknown config key '{key}'." in msg
    assert f"Did you mean '{near}'?" in msg


def test_unknown_key_lists_valid_keys_of_its_section():
    msg = error_of({"algo": {"name": "ewc", "ewc_lambdaa": 5}})
    assert ("Valid keys in 'algo': ewc_lambda, fisher, fisher_batch_size, fisher_ema_decay, fisher_samples, "
            "fisher_update_after, name, plugins.") in msg
    msg = error_of({"zzzzzzzz": 1})
    assert "Did you mean" not in msg and "Valid keys in the top level:" in msg


def test_algorithm_keys_belong_to_their_algorithm():
    # ewc_lambda is a key of EWC, not of fine-tuning.
    msg = error_of({"algo": {"name": "naive", "ewc_lambda": 5}})
    assert "unknown config key 'algo.ewc_lambda'" in msg
    assert "Valid keys in 'algo': name, plugins." in msg


# -- wrong types and values ---------------------------------------------------------------------

@pytest.mark.parametrize("cfg, key, words", [
    ({"benchmark": {"num_tasks": "abc"}}, "benchmark.num_tasks", "'abc' is not a valid integer"),
    ({"benchmark": {"batch_size": 1.5}}, "benchmark.batch_size", "not a valid integer"),
    ({"optimizer": {"lr": "fast"}}, "optimizer.lr", "'fast' is not a valid float"),
    ({"algo": {"name": "ewc", "ewc_lambda": "big"}}, "algo.ewc_lambda", "'big' is not a valid float"),
    ({"benchmark": {"normalize": "maybe"}}, "benchmark.normalize", "maybe"),
    ({"seed": "abc"}, "seed", "'abc' is not a valid integer"),
])
def test_wrong_type_names_the_key(cfg, key, words):
    msg = error_of(cfg)
    assert f"config key '{key}'" in msg
    assert words in msg


@pytest.mark.parametrize("section", ["benchmark", "training", "optimizer", "backbone", "backend"])
def test_scalar_where_a_section_belongs_names_the_section(section):
    msg = error_of({section: 5})
    assert f"'{section}'" in msg
    assert "'?'" not in msg


def test_strings_that_are_numbers_are_converted():
    typed, _ = validate_config({"benchmark": {"num_tasks": "3"}, "optimizer": {"lr": "0.5"}})
    assert typed.benchmark.num_tasks == 3 and typed.optimizer.lr == 0.5


@pytest.mark.parametrize("cfg, key, words", [
    ({"benchmark": {"num_tasks": 0}}, "benchmark.num_tasks", "positive"),
    ({"benchmark": {"batch_size": -4}}, "benchmark.batch_size", "positive"),
    ({"benchmark": {"classes_per_task": 0}}, "benchmark.classes_per_task", "positive"),
    ({"optimizer": {"lr": -1}}, "optimizer.lr", "positive"),
    ({"training": {"epochs_per_task": 0}}, "training.epochs_per_task", "positive"),
    ({"backbone": {"dropout": 1.0}}, "backbone.dropout", "[0, 1)"),
    ({"benchmark": {"scenario": "task-il"}}, "benchmark.scenario", "Did you mean 'task_il'?"),
    ({"benchmark": {"interpolation": "bicubic"}}, "benchmark.interpolation", "nearest, bilinear"),
    ({"training": {"eval_on": "every"}}, "training.eval_on", "all, seen"),
    ({"device": "gpu"}, "device", "auto, cpu, cuda"),
    ({"threads": 0}, "threads", "positive integer"),
])
def test_bad_values_name_the_key(cfg, key, words):
    msg = error_of(cfg)
    assert f"'{key}'" in msg
    assert words in msg


@pytest.mark.parametrize("cfg, words", [
    ({"benchmark": {"name": "rotatedmnistt"}}, "unknown benchmark 'rotatedmnistt'. Did you mean 'rotatedmnist'?"),
    ({"algo": {"name": "ewcc"}}, "unknown algorithm 'ewcc'. Did you mean 'ewc'?"),
    ({"optimizer": {"type": "adamw"}}, "unknown optimizer 'adamw'. Did you mean 'adam'?"),
    ({"backbone": {"type": "resnet"}}, "unknown backbone 'resnet'. Did you mean 'resnet18'? Valid backbones: cnn, mlp, resnet18."),
    ({"backend": {"name": "tf"}}, "unknown backend 'tf'. Valid backends: jax, torch."),
])
def test_unknown_names_are_checked_against_registries(cfg, words):
    assert words in error_of(cfg)


def test_defaults_validate_and_are_typed():
    typed, warnings = validate_config({})
    assert warnings == []
    assert typed.algo.name == AlgoConfig.name
    assert typed.benchmark.name == RunConfig().benchmark.name
    assert typed.backend.name == "torch"
    assert typed.expected is None


def test_validate_does_not_modify_its_argument():
    cfg = {"mode": "pytorch", "training": {"epoch_per_task": 2}, "backend": {"compile": False},
           "expected": {"avg_acc": 80.0}}
    before = copy.deepcopy(cfg)
    _, w1 = validate_config(cfg)
    assert cfg == before
    # Validating the same dict again gives the same warnings (nothing was consumed the first time).
    _, w2 = validate_config(cfg)
    assert w1 == w2 and len(w1) == 1


# -- SequeL-format quirks -----------------------------------------------------------------------

@pytest.mark.parametrize("mode, backend", [("jax", "jax"), ("pytorch", "torch"), ("torch", "torch")])
def test_mode_selects_backend(mode, backend):
    typed, _ = validate_config({"mode": mode})
    assert typed.backend.name == backend
    assert typed.mode == mode


def test_mode_errors():
    assert "mode 'tf' is not known" in error_of({"mode": "tf"})
    msg = error_of({"mode": "jax", "backend": {"name": "torch"}})
    assert "mode: jax" in msg and "backend.name: torch" in msg


def test_epoch_per_task_is_mapped_with_a_warning():
    typed, warnings = validate_config({"training": {"epoch_per_task": 3}})
    assert typed.training.epochs_per_task == 3
    assert warnings == ["'training.epoch_per_task' is read as 'training.epochs_per_task'."]
    # Both spellings with the same value are fine; with different values it is an error.
    typed, _ = validate_config({"training": {"epoch_per_task": 3, "epochs_per_task": 3}})
    assert typed.training.epochs_per_task == 3
    msg = error_of({"training": {"epoch_per_task": 3, "epochs_per_task": 2}})
    assert "'training.epoch_per_task'" in msg and "'training.epochs_per_task'" in msg


def test_expected_avg_acc_becomes_metric_and_value():
    typed, _ = validate_config({"expected": {"avg_acc": 82.3}, "source": "mcsgd paper"})
    assert typed.expected.metric == "avg_acc"
    assert typed.expected.value == pytest.approx(82.3)
    assert typed.expected.source == "mcsgd paper"  # the file's top-level source is kept with it
    # An explicit value wins over the SequeL spelling.
    typed, _ = validate_config({"expected": {"avg_acc": 82.3, "value": 80.0}})
    assert typed.expected.value == 80.0


def test_wandb_block_is_accepted_with_a_warning():
    typed, warnings = validate_config({"wandb": {"entity": "ENTITY", "project": "PROJECT"}})
    assert typed.wandb == {"entity": "ENTITY", "project": "PROJECT"}
    assert len(warnings) == 1 and "wandb" in warnings[0]


# -- plugins ------------------------------------------------------------------------------------

def test_plugins_extend_the_algorithm_schema():
    typed, _ = validate_config({"algo": {"name": "naive", "plugins": ["ewc"], "ewc_lambda": 5}})
    assert typed.algo.name == "naive"
    assert list(typed.algo.plugins) == ["ewc"]
    assert typed.algo.ewc_lambda == 5.0
    assert typed.algo.fisher_samples == 1024  # the plugin's defaults come with it
    msg = error_of({"algo": {"name": "naive", "plugins": ["ewc"], "ewc_lambda": "wrong"}})
    assert "config key 'algo.ewc_lambda'" in msg


def test_plugin_errors():
    assert "unknown plugin 'ewcc'. Did you mean 'ewc'?" in error_of(
        {"algo": {"name": "naive", "plugins": ["ewcc"]}})
    assert "already the algorithm itself" in error_of({"algo": {"name": "ewc", "plugins": ["ewc"]}})
    assert "must be a list" in error_of({"algo": {"name": "naive", "plugins": "ewc"}})
    assert "unknown config key 'algo.ewc_lambda'" in error_of(
        {"algo": {"name": "naive", "plugins": [], "ewc_lambda": 1}})


# -- the published SequeL files -----------------------------------------------------------------

def load_sequel(name: str) -> dict:
    path = SEQUEL / f"{name}_rotatedmnist.yaml"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return yaml.safe_load(path.read_text())


def test_sequel_ewc_file_validates():
    typed, warnings = validate_config(load_sequel("ewc"))
    assert typed.backend.name == "torch"  # mode: pytorch
    assert typed.algo.name == "ewc" and typed.algo.ewc_lambda == 1.0
    assert typed.benchmark.num_tasks == 20 and typed.benchmark.per_task_rotation == 9.0
    assert typed.backbone.num_classes == 10 and typed.backbone.dropout == pytest.approx(0.2)
    assert typed.optimizer.lr_decay == pytest.approx(0.8)
    assert typed.version == "0.0.1"
    assert any("wandb" in w for w in warnings)


@pytest.mark.parametrize("name, expected", [("lamaml", 77.42), ("mcsgd", 82.3)])
def test_sequel_files_of_other_algorithms(name, expected):
    raw = load_sequel(name)
    if name not in ALGORITHMS:
        # The algorithm is not implemented yet: validation must stop with a clear
        # 'unknown algorithm' error that lists the algorithms there are.
        msg = error_of(raw)
        assert f"unknown algorithm '{name}'" in msg
        assert "Valid algorithms:" in msg and "ewc" in msg and "naive" in msg
        return
    # Once the algorithm's schema is registered, every key of the published file must be known.
    typed, warnings = validate_config(raw)
    assert typed.algo.name == name
    assert typed.expected.metric == "avg_acc"
    assert typed.expected.value == pytest.approx(expected)
    assert typed.expected.source == raw["source"]
    if name == "lamaml":
        assert typed.training.epochs_per_task == 1
        assert "'training.epoch_per_task' is read as 'training.epochs_per_task'." in warnings


# -- conf/ composed with Hydra ------------------------------------------------------------------

@pytest.fixture
def hydra_conf():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_conf_default_composes_and_validates(hydra_conf):
    cfg = compose(config_name="config")
    typed, warnings = validate_config(cfg)
    assert warnings == []
    assert (typed.algo.name, typed.benchmark.name, typed.backbone.type, typed.optimizer.type,
            typed.backend.name) == ("ewc", "rotatedmnist", "mlp", "sgd", "torch")
    assert typed.benchmark.num_tasks == 20 and typed.benchmark.per_task_rotation == 9.0


@pytest.mark.parametrize("group, field", [("algo", "name"), ("benchmark", "name"),
                                          ("backbone", "type"), ("optimizer", "type"),
                                          ("backend", "name")])
def test_every_conf_option_composes_and_validates(hydra_conf, group, field):
    names = options(group)
    assert names, f"conf/{group} is empty"
    for option in names:
        cfg = compose(config_name="config", overrides=[f"{group}={option}"])
        typed, _ = validate_config(cfg)
        # The option's file selects the component of the same name.
        assert getattr(typed[group], field) == option, (group, option)
        if group == "algo":
            # The YAML file and the schema's defaults are two places for one default: they agree,
            # and the file lists every key of the algorithm.
            defaults = ALGORITHMS.get(option)()
            for key, value in cfg.algo.items():
                assert getattr(defaults, key) == value, (option, key)
            assert set(cfg.algo.keys()) == set(typed.algo.keys()), option


def test_conf_composition_with_overrides(hydra_conf):
    cfg = compose(config_name="config", overrides=["algo=naive", "algo.plugins=[ewc]", "+algo.ewc_lambda=7"])
    typed, _ = validate_config(cfg)
    assert typed.algo.ewc_lambda == 7.0 and list(typed.algo.plugins) == ["ewc"]
    cfg = compose(config_name="config", overrides=["+benchmark.num_task=3"])
    with pytest.raises(ConfigError, match=r"Did you mean 'benchmark.num_tasks'\?"):
        validate_config(cfg)


def test_algorithm_outside_its_scenarios_is_an_error():
    from cl_runner.config import validate_config
    from cl_runner.errors import ConfigError

    # MC-SGD is defined for domain-IL and task-IL streams only.
    with pytest.raises(ConfigError, match="not defined for the class_il scenario"):
        validate_config({"algo": {"name": "mcsgd"}, "benchmark": {"name": "splitmnist"}})
    validate_config({"algo": {"name": "mcsgd"}, "benchmark": {"name": "rotatedmnist"}})


@pytest.mark.parametrize("algo,msg", [({"name": "ewc", "fisher": "exact"}, "algo.fisher"),
                                      ({"name": "ewc", "fisher_samples": 0}, "fisher_samples"),
                                      ({"name": "joint", "mode": "finall"}, "algo.mode")])
def test_algorithm_values_are_checked(algo, msg):
    from cl_runner.config import validate_config
    from cl_runner.errors import ConfigError

    with pytest.raises(ConfigError, match=msg):
        validate_config({"algo": algo})
