"""The runtime is the leaf of the project: it must import and its CLIs must answer --help
on a machine without torch."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import runtime

ROOT = Path(__file__).resolve().parents[1]
BLOCK = "import sys; sys.modules['torch'] = None\n"  # makes `import torch` raise ImportError


def run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def runtime_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(runtime.__path__, "runtime."))


def test_torch_is_really_blocked():
    r = run_blocked("import torch")
    assert r.returncode != 0 and "import of torch halted" in r.stderr


def test_every_runtime_module_imports_without_torch():
    mods = runtime_modules()
    assert {"runtime.io", "runtime.preprocess", "runtime.spec", "runtime.cli"} <= set(mods)
    r = run_blocked(f"import importlib\nfor m in {mods!r}:\n    importlib.import_module(m)\nprint('ok', {len(mods)})")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"ok {len(mods)}"


@pytest.mark.parametrize("cli", ["runtime.cli", "export.cli", "benchmarks.cli", "train.cli"])
def test_cli_help_works_without_torch(cli):
    r = run_blocked(f"import sys; sys.argv = ['x', '--help']\nfrom {cli} import main\nmain()")
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout and "Example" in r.stdout
