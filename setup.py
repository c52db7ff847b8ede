"""Packaging beside pyproject.toml (which holds the metadata): the package list, and the top-level
folders conf/, sweeps/ and expected_results/ shipped inside the wheel as the package data of
cl_runner._conf, cl_runner._sweeps and cl_runner._expected (found by cl_runner/resources.py).
The folders stay at the checkout's top level, where Hydra users and editors expect them."""

from setuptools import find_packages, setup

DATA_FOLDERS = {"cl_runner._conf": "conf", "cl_runner._sweeps": "sweeps",
                "cl_runner._expected": "expected_results"}

setup(
    packages=find_packages(include=["cl_runner", "cl_runner.*", "hydra_plugins", "hydra_plugins.*"])
    + list(DATA_FOLDERS),
    package_dir=DATA_FOLDERS,
    package_data={
        "cl_runner": ["py.typed", "backends/torch/*.c", "benchmarks/*.c"],
        **{name: ["*.yaml", "**/*.yaml"] for name in DATA_FOLDERS},
    },
)
