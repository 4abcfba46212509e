"""The house style's mechanical rules, checked on every run of the suite.

Python must pass ruff (the rules and the width of 100 in pyproject.toml); the C++ and CUDA
sources must be formatted by clang-format with the repository's .clang-format (Google style,
width 100). Both tools come with the ``test`` extra, at pinned versions, so that a new release
cannot change the verdict.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPP_SOURCES = sorted(p for pattern in ("*.cpp", "*.h", "*.cu", "*.cuh")
                     for p in (ROOT / "csrc").rglob(pattern))


def _tool(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        raise AssertionError(f"{name} is missing from {path.parent}; install the test extra: "
                             "pip install --no-build-isolation -e '.[test]'")
    return str(path)


def test_python_passes_ruff():
    proc = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"ruff check found problems:\n{proc.stdout}{proc.stderr}"


def test_cpp_sources_are_clang_formatted():
    assert CPP_SOURCES, "no C++ sources found under csrc/"
    proc = subprocess.run([_tool("clang-format"), "--dry-run", "--Werror", *map(str, CPP_SOURCES)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, (
        "clang-format would change these sources (run clang-format -i on them):\n"
        f"{proc.stderr[-4000:]}")
