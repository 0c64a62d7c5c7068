"""``biofed config init|check``: every template is valid and carries its defaults; check reports problems."""

from __future__ import annotations

import tomllib

import pytest
from click.testing import CliRunner

from biofed.apps.cli import cli
from biofed.apps.config_cli import KINDS, template
from biofed.config import RECOMMENDED_PRIVACY, BrokerServiceConfig, CoordinatorConfig, DeviceConfig, load_config


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_template_round_trips_through_check(tmp_path, kind, monkeypatch):
    for name in [n for n in __import__("os").environ if n.startswith("BIOFED_")]:
        monkeypatch.delenv(name)
    runner = CliRunner()
    printed = runner.invoke(cli, ["config", "init", kind])
    assert printed.exit_code == 0, printed.output
    out = tmp_path / kind / "config.toml"
    written = runner.invoke(cli, ["config", "init", kind, "--out", str(out)])
    assert written.exit_code == 0, written.output
    assert out.read_text() == printed.stdout == template(kind)
    checked = runner.invoke(cli, ["config", "check", str(out)])
    assert checked.exit_code == 0, checked.output
    assert f"valid {kind} config" in checked.output


@pytest.mark.parametrize(
    "kind,model", [("coordinator", CoordinatorConfig), ("device", DeviceConfig), ("broker", BrokerServiceConfig)]
)
def test_template_lists_every_setting_with_its_default(tmp_path, kind, model):
    text = template(kind)
    data = tomllib.loads(text)
    path = tmp_path / "c.toml"
    path.write_text(text)
    config = load_config(path, model, environ={})
    # every top-level setting appears, set or commented out (None defaults)
    for name in model.model_fields:
        assert f"{name} =" in text or f"[{name}]" in text, name
    if kind == "coordinator":
        assert {key: data["dp"][key] for key in RECOMMENDED_PRIVACY} == RECOMMENDED_PRIVACY
        assert config.dp.epsilon_budget == RECOMMENDED_PRIVACY["epsilon_budget"]
        assert "# [dp.adaptive_clipping]" in text and "# target_quantile = 0.5" in text
        assert config.broker.max_message_bytes == 16 * 1024 * 1024 and "BIOFED_BROKER_HOST" in text


def test_init_refuses_to_overwrite(tmp_path):
    out = tmp_path / "c.toml"
    out.write_text("keep")
    result = CliRunner().invoke(cli, ["config", "init", "device", "--out", str(out)])
    assert result.exit_code == 2 and "--force" in result.output and out.read_text() == "keep"
    assert CliRunner().invoke(cli, ["config", "init", "device", "--out", str(out), "--force"]).exit_code == 0


def test_check_reports_problems_with_exit_code_1(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(template("coordinator").replace("noise_multiplier = 2.0", "noise_multipler = 2.0"))
    result = CliRunner().invoke(cli, ["config", "check", str(path)])
    assert result.exit_code == 1
    assert "dp.noise_multipler: unknown key; did you mean 'noise_multiplier'?" in result.output


def test_check_runs_the_coordinator_checks(tmp_path):
    # valid TOML for the model, but fedadam has no server_lr: the old docstring example
    path = tmp_path / "c.toml"
    path.write_text(
        'fleet = "w"\nrounds = 3\nstate_dir = "s"\n[strategy]\nname = "fedadam"\n'
        "params = { server_lr = 0.01 }\n[dp]\nnoise_multiplier = 0.0\n"
    )
    result = CliRunner().invoke(cli, ["config", "check", str(path)])
    assert result.exit_code == 1 and "server_lr" in result.output


def test_check_missing_file_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli, ["config", "check", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2 and "does not exist" in result.output
