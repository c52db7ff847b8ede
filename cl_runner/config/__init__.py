"""Configuration schemas and validation."""

from cl_runner.config.schema import (  # noqa: F401
    AlgoConfig,
    BackboneConfig,
    BackendConfig,
    BenchmarkConfig,
    ExpectedConfig,
    OptimizerConfig,
    RunConfig,
    TrainingConfig,
)
from cl_runner.config.validate import validate_config  # noqa: F401
