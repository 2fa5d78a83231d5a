"""The house rules the suite enforces: ruff's lint and format over the package, tests, benchmarks and the docs'
scripts, and the import contract of pyproject.toml (the rooms in layers; the engine free of Lightning)."""

import subprocess
import sys
from pathlib import Path

from helpers import REPO

LINTED = ["tcube_lightning", "tests", "benchmarks", "docs", "main.py"]
RUFF = Path(sys.executable).with_name("ruff")


def test_ruff_lint_and_format_pass():
    lint = subprocess.run([RUFF, "check", *LINTED], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout[-4000:]
    formatted = subprocess.run([RUFF, "format", "--check", *LINTED], cwd=REPO, capture_output=True, text=True)
    assert formatted.returncode == 0, formatted.stdout[-4000:]


def test_import_contracts_are_kept(monkeypatch):
    from importlinter.cli import lint_imports

    monkeypatch.chdir(REPO)
    assert lint_imports(config_filename="pyproject.toml", no_cache=True) == 0
