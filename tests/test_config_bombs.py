"""Hostile YAML configs (billion laughs in any field, 100,000 nested brackets, recursive
aliases, huge files, huge values) are each a short ConfigError in well under a second."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

import actmon
from actmon.config import MAX_YAML_NODES, load_config


def _laughs(levels: int = 9) -> str:
    """A flow sequence whose aliases expand to 9**levels strings (387 million for 9)."""
    items = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for k in range(1, levels):
        items.append(f"&a{k} [{', '.join([f'*a{k - 1}'] * 9)}]")
    return "[" + ", ".join(items) + "]"


def _refused(tmp_path: Path, text: str, match: str, longest: int = 300) -> str:
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    start = time.monotonic()
    with pytest.raises(actmon.ConfigError, match=match) as info:
        load_config(path)
    assert time.monotonic() - start < 2
    message = str(info.value)
    assert len(message) < longest, message
    return message


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "text",
    [
        f"log_every: {_laughs()}\n",
        f"include: {_laughs()}\n",
        f"rules: {_laughs()}\n",
        f"kinds: {{x: {_laughs()}}}\n",
        f"sinks: {{store: {{path: {_laughs()}}}}}\n",
    ],
    ids=["log_every", "include", "rules", "kinds", "sinks"],
)
def test_billion_laughs_is_refused(tmp_path, text):
    message = _refused(tmp_path, text, f"more than {MAX_YAML_NODES:,} nodes")
    assert message.startswith("config file ")
    assert "(a YAML bomb?)" in message


@pytest.mark.timeout(60)
@pytest.mark.parametrize("opener", ["[", "{a: "])
def test_deep_nesting_is_refused_without_a_recursion_error(tmp_path, opener):
    closer = "]" if opener == "[" else "}"
    text = "log_every: " + opener * 100_000 + "1" + closer * 100_000 + "\n"
    _refused(tmp_path, text, "nests deeper than 64 levels")


@pytest.mark.timeout(60)
def test_recursive_alias_is_refused(tmp_path):
    _refused(tmp_path, "include: &a [*a]\n", "an alias refers to a node that contains it")


@pytest.mark.timeout(60)
def test_huge_file_is_refused(tmp_path):
    _refused(tmp_path, "# padding\n" * 200_000 + "log_every: 4\n", "over 1,000,000 characters")


@pytest.mark.timeout(60)
def test_large_wrong_value_gives_a_short_message(tmp_path):
    """2,000 items (under the bounds) that are each wrong: ten lines and a count, values cut."""
    items = ", ".join(str(i) for i in range(2_000))
    message = _refused(tmp_path, f"include: [{items}]\nlog_every: [{items}]\n", "invalid", 1000)
    assert message.splitlines()[-1].startswith("  ... and ")
    assert len(message.splitlines()) == 12


def test_anchors_within_the_bounds_still_work(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(
        "rules:\n"
        "  - {name: a, metric: std, op: '>', threshold: 1, layers: &enc {globs: ['enc.*']}}\n"
        "  - {name: b, metric: mean, op: '>', threshold: 1, layers: *enc}\n"
    )
    cfg = load_config(path)
    assert [r.layers.globs for r in cfg.rules] == [["enc.*"], ["enc.*"]]


def test_config_validate_cli_refuses_a_bomb_fast(tmp_path):
    """The command that hung for over 120 s: exit 1, one short line, no traceback."""
    path = tmp_path / "bomb.yaml"
    path.write_text(f"log_every: {_laughs()}\n")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "actmon.cli", "config", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1
    assert "(a YAML bomb?)" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr) < 300
