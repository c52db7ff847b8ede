"""The component registry: lookups, per-backend implementations and the errors a user sees."""

from __future__ import annotations

import pytest

from cl_runner import catalog
from cl_runner.errors import ClrunError, ConfigError
from cl_runner.registry import ALGORITHMS, BENCHMARKS, PLUGINS, Registry


@pytest.fixture
def reg() -> Registry:
    """A fresh registry so these tests never touch the global ones."""
    r = Registry("algorithm")
    r.register("naive", summary="fine-tuning")("naive-schema")
    r.register("ewc", paper="Kirkpatrick et al. 2017")("ewc-schema")
    r.register("ewc", backend="torch")("ewc-torch")
    r.register("joint", backend="torch")("joint-torch")
    r.register("joint", backend="jax")("joint-jax")
    return r


def test_register_returns_the_object_unchanged(reg):
    class Thing:
        pass

    assert reg.register("thing")(Thing) is Thing
    assert reg.get("thing") is Thing


def test_get_backend_independent_and_per_backend(reg):
    assert reg.get("ewc") == "ewc-schema"
    assert reg.get("ewc", backend="torch") == "ewc-torch"
    assert reg.get("joint", backend="torch") == "joint-torch"
    assert reg.get("joint", backend="jax") == "joint-jax"
    assert reg.entry("joint").backends == ["jax", "torch"]
    assert reg.entry("ewc").backends == ["torch"]  # the schema (backend None) is not a backend
    assert reg.entry("naive").backends == []


def test_names_membership_and_meta(reg):
    assert reg.names() == ["ewc", "joint", "naive"]
    assert reg.names("*n*") == ["joint", "naive"]
    assert "ewc" in reg and "ewcc" not in reg and 3 not in reg
    assert len(reg) == 3
    assert reg.meta("ewc") == {"paper": "Kirkpatrick et al. 2017"}
    assert [n for n, _ in reg.items()] == ["ewc", "joint", "naive"]


def test_meta_merges_across_registrations(reg):
    reg.register("naive", backend="torch", fast=True)("naive-torch")
    assert reg.meta("naive") == {"summary": "fine-tuning", "fast": True}


@pytest.mark.parametrize("typo, nearest", [("ewcc", "ewc"), ("EWC", "ewc"), ("jont", "joint"),
                                           ("naiv", "naive")])
def test_unknown_name_lists_valid_names_and_closest(reg, typo, nearest):
    with pytest.raises(ConfigError) as ei:
        reg.get(typo)
    msg = str(ei.value)
    assert f"unknown algorithm '{typo}'" in msg
    assert f"Did you mean '{nearest}'?" in msg
    assert "Valid algorithms: ewc, joint, naive." in msg


def test_unknown_name_without_close_match_has_no_suggestion(reg):
    with pytest.raises(ConfigError) as ei:
        reg.get("zzzzzz")
    assert "Did you mean" not in str(ei.value)
    assert "Valid algorithms: ewc, joint, naive." in str(ei.value)


def test_unknown_name_in_empty_registry():
    with pytest.raises(ConfigError, match=r"\(none registered\)"):
        Registry("widget").get("x")


def test_non_string_name_is_a_config_error(reg):
    with pytest.raises(ConfigError, match="unknown algorithm '5'"):
        reg.entry(5)


def test_errors_are_clrun_errors(reg):
    # The command line turns every ClrunError into a message and exit status 2.
    with pytest.raises(ClrunError):
        reg.get("nope")


def test_missing_backend_names_existing_backends(reg):
    with pytest.raises(ConfigError) as ei:
        reg.get("ewc", backend="jax")
    msg = str(ei.value)
    assert "algorithm 'ewc' is not available on backend 'jax'" in msg
    assert "(implemented for: torch)" in msg
    assert "backend=torch" in msg


def test_missing_backend_lists_all_backends(reg):
    reg.register("replay", backend="torch")("r-torch")
    reg.register("replay", backend="jax")("r-jax")
    with pytest.raises(ConfigError, match=r"implemented for: jax, torch"):
        reg.get("replay", backend="tf")


def test_missing_backend_when_only_schema_exists(reg):
    # A schema without any implementation: the message must say that nothing implements it.
    with pytest.raises(ConfigError, match=r"'naive'.*(no implementation|implemented for: none)"):
        reg.get("naive", backend="torch")


def test_backend_independent_lookup_of_backend_only_entry(reg):
    with pytest.raises(ConfigError, match=r"'joint' has only backend implementations: jax, torch"):
        reg.get("joint")


def test_duplicate_registration_is_an_error(reg):
    with pytest.raises(ValueError, match=r"algorithm 'ewc' is registered twice for backend 'torch'"):
        reg.register("ewc", backend="torch")("another-ewc")
    with pytest.raises(ValueError, match=r"algorithm 'naive' is registered twice$"):
        reg.register("naive")("another-naive")
    # The first registration is kept.
    assert reg.get("ewc", backend="torch") == "ewc-torch"
    assert reg.get("naive") == "naive-schema"


def test_registering_the_same_object_again_is_allowed(reg):
    # Re-importing a module re-runs its decorators with the same objects.
    reg.register("ewc", backend="torch")("ewc-torch")
    assert reg.get("ewc", backend="torch") == "ewc-torch"


def test_global_registries_after_loading_torch():
    catalog.load_backend("torch")
    for name in ("naive", "joint", "ewc"):
        assert name in ALGORITHMS
        assert "torch" in ALGORITHMS.entry(name).backends
    assert "ewc" in PLUGINS and PLUGINS.get("ewc", backend="torch") is not None
    assert set(BENCHMARKS.names()) >= {"splitmnist", "permutedmnist", "rotatedmnist",
                                       "splitfmnist", "permutedfmnist", "rotatedfmnist"}
    with pytest.raises(ConfigError, match=r"Did you mean 'ewc'\?"):
        ALGORITHMS.get("ewcc")
