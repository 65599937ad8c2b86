"""bench/ scripts as modules for tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_bench_script(name: str, module_name: str | None = None):
    """bench/<name>.py as a module, without bench/ on sys.path (its kernels.py would
    shadow the `kernels` package for later tests)."""
    module_name = module_name or name
    spec = importlib.util.spec_from_file_location(module_name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module
