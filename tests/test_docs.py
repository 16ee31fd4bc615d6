"""The README is the manual: every option, output column, exit code and variable is in it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import click
import pytest

from batchgen.cli import cli
from batchgen.results import OUTPUT_COLUMNS

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


SECTIONS = {
    "run": "## `batchgen run",
    "validate": "## `batchgen run",
    "simulate": "## The simulator",
    "cost": "### `batchgen cost",
}


def section(title: str) -> str:
    """The README's text from the ``## `` heading starting with ``title`` to the next one."""
    start = README.index(title)
    level = title.split(" ")[0]
    end = README.find(f"\n{level} ", start + 1)
    return README[start : end if end != -1 else None]


@pytest.mark.parametrize("command", ["run", "validate", "simulate", "cost"])
def test_every_option_is_in_its_commands_table(command):
    text = section(SECTIONS[command])
    params = cli.commands[command].params
    names = [opt for p in params if isinstance(p, click.Option) for opt in p.opts + p.secondary_opts]
    missing = [
        name
        for name in names
        if name not in ("-h", "--help") and not re.search(rf"\| `[^|]*{re.escape(name)}\b", text)
    ]
    assert missing == []


def test_every_output_column_is_documented():
    assert [c for c in OUTPUT_COLUMNS if f"| `{c}` |" not in README] == []


@pytest.mark.parametrize("code", [0, 1, 2, 3, 4, 5, 6, 130, 143])
def test_exit_codes_are_documented(code):
    assert f"| {code} |" in README


def test_environment_variables_are_documented():
    used = set()
    for path in (ROOT / "batchgen").rglob("*.py"):
        used |= set(re.findall(r'"((?:DASHSCOPE|BATCHGEN)_[A-Z_]+)"', path.read_text()))
    assert used and [v for v in sorted(used) if f"| `{v}` |" not in README] == []


def test_ci_runs_the_readme_test_command():
    extracted = subprocess.run(
        ["bash", ".ci/run", "--print"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert extracted == ("python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/pytest")
    assert f"```sh\n{extracted}\n```" in README


def test_the_cost_example_is_what_the_command_prints():
    from click.testing import CliRunner

    block = README.split("$ batchgen cost tests/data/cost_fixture.csv\n", 1)[1].split("```", 1)[0]
    result = CliRunner().invoke(cli, ["cost", str(ROOT / "tests" / "data" / "cost_fixture.csv")])
    assert result.exit_code == 0
    assert result.stdout == block
