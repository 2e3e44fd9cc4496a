"""Repository-level checks: environment.yml agrees with pyproject.toml."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pip_lines(text):
    """The requirement lines under `- pip:` in environment.yml."""
    lines, inside = [], False
    for line in text.splitlines():
        if re.match(r"\s*- pip:\s*$", line):
            inside = True
        elif inside and re.match(r"\s+- ", line):
            lines.append(line.strip()[2:].strip())
        elif inside and line.strip() and not line.startswith(" "):
            inside = False
    return lines


def test_environment_yml_matches_pyproject():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(meta["dependencies"]) | set(meta["optional-dependencies"]["dev"])
    got = [x for x in _pip_lines((ROOT / "environment.yml").read_text()) if x != "-e ."]
    assert sorted(got) == sorted(wanted)
    assert "-e ." in _pip_lines((ROOT / "environment.yml").read_text())


def test_environment_yml_pins_python_311():
    assert re.search(r"^\s+- python=3\.11\s*$", (ROOT / "environment.yml").read_text(), re.M)
