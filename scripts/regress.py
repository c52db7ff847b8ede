#!/usr/bin/env python
"""The regression tool from a checkout: ``python scripts/regress.py [options]`` is
``clrun-regress`` (cl_runner/regress.py, also ``python -m cl_runner.regress``); see there."""

import sys
from pathlib import Path

if __name__ == "__main__":
    # A checkout without an install still finds its own package.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from cl_runner.regress import main

    sys.exit(main(prog="python scripts/regress.py"))
