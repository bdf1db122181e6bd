"""Config loading: sources, precedence and the exact errors users see."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from torch import nn

import actmon
from actmon.cli import main
from actmon.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_default_yaml_documents_exactly_the_defaults():
    data = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    assert Config.model_validate(data) == Config()
    assert set(data) == set(Config.model_fields)  # every field is listed in the file


def test_sources_dict_config_and_keywords():
    assert load_config({"log_every": 5}).log_every == 5
    assert load_config(Config(sample_every=2)).sample_every == 2
    cfg = load_config({"histogram": {"linear_bins": 8}}, histogram={"min_exp": -10})
    assert (cfg.histogram.linear_bins, cfg.histogram.min_exp) == (8, -10)


def test_precedence_file_then_env_then_keywords(tmp_path, monkeypatch):
    base = tmp_path / "base.yaml"
    base.write_text("log_every: 20\nsample_every: 5\nrun_name: base\n")
    env = tmp_path / "env.yaml"
    env.write_text("log_every: 30\n")
    monkeypatch.setenv("ACTMON_CONFIG", str(env))
    cfg = load_config(base, run_name="kw")
    assert (cfg.log_every, cfg.sample_every, cfg.run_name) == (30, 5, "kw")


def test_unknown_key_names_field_and_allowed_values(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("log_evry: 5\n")
    with pytest.raises(actmon.ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert f"invalid actmon config in {path}:" in message
    assert (
        "field 'log_evry': unknown field (did you mean 'log_every'?); allowed: run_name," in message
    )


def test_bad_value_names_field_value_and_rule():
    with pytest.raises(
        actmon.ConfigError,
        match=r"field 'log_every': got 0; Input should be "
        r"greater than or equal to 1",
    ):
        load_config(log_every=0)
    with pytest.raises(
        actmon.ConfigError,
        match=r"field 'kinds.enc\*': got 'reluu'; Input should "
        r"be 'relu', 'leaky'",
    ):
        load_config(kinds={"enc*": "reluu"})
    with pytest.raises(
        actmon.ConfigError,
        match=r"field 'histogram': .*min_exp \(5\) must be "
        r"smaller than max_exp \(2\)",
    ):
        load_config(histogram={"min_exp": 5, "max_exp": 2})
    with pytest.raises(
        actmon.ConfigError,
        match=r"field 'quantiles': got \[0.5, 1.5\]; quantile "
        r"1.5 is outside \(0, 1\)",
    ):
        load_config(quantiles=[0.5, 1.5])
    with pytest.raises(
        actmon.ConfigError,
        match=r"field 'histogram.bins_per_octave': got 3; "
        r"Input should be 1, 2 or 4",
    ):
        load_config(histogram={"bins_per_octave": 3})


def test_the_error_names_the_source_that_holds_the_bad_value(tmp_path, monkeypatch):
    env = tmp_path / "env.yaml"
    env.write_text("sample_every: -1\n")
    monkeypatch.setenv("ACTMON_CONFIG", str(env))
    with pytest.raises(
        actmon.ConfigError,
        match=rf"in {env} \(from \$ACTMON_CONFIG\):\n  field "
        r"'sample_every': got -1",
    ):
        load_config({"log_every": 4})


def test_yaml_syntax_and_shape_errors(tmp_path):
    bad = tmp_path / "syntax.yaml"
    bad.write_text("log_every: 5\nkinds: {a: relu\n")
    with pytest.raises(actmon.ConfigError, match=r"is not valid YAML at line 3, column 1"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- log_every\n")
    with pytest.raises(
        actmon.ConfigError, match="must hold a mapping of fields at the top level, got list"
    ):
        load_config(listing)
    with pytest.raises(actmon.ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_kind_override_that_cannot_apply_fails_at_watch():
    with pytest.raises(actmon.ConfigError, match=r"layer '0' \(Linear\) cannot be 'clipping'"):
        actmon.watch(nn.Sequential(nn.Linear(2, 2)), kinds={"0": "clipping"})


def test_kind_override_is_applied():
    monitor = actmon.watch(nn.Sequential(nn.Linear(2, 2), nn.Identity()), kinds={"1": "relu"})
    monitor.close()
    assert monitor.layers[1].kind is actmon.Kind.RELU


def test_cli_config_validate(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(main, ["config", "validate", str(ROOT / "configs" / "default.yaml")])
    assert ok.exit_code == 0, ok.output
    assert "valid" in ok.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("saturation_eps: 0.7\n")
    result = runner.invoke(main, ["config", "validate", str(bad)])
    assert result.exit_code == 1
    assert "field 'saturation_eps': got 0.7; Input should be less than 0.5" in result.output
