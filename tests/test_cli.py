import subprocess
import sys

from biofed import __version__


def test_version_and_help():
    out = subprocess.run([sys.executable, "-m", "biofed", "--version"], capture_output=True, text=True, check=True)
    assert __version__ in out.stdout
    out = subprocess.run([sys.executable, "-m", "biofed", "--help"], capture_output=True, text=True, check=True)
    assert "Usage" in out.stdout


def test_every_registered_command_has_help():
    from click.testing import CliRunner

    from biofed.apps.cli import COMMANDS, cli

    runner = CliRunner()
    for name in COMMANDS:
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)


def _all_commands():
    """``(path, click command)`` of every registered command and sub-command."""
    import click

    from biofed.apps.cli import COMMANDS, cli

    ctx = click.Context(cli)
    for name in COMMANDS:
        command = cli.get_command(ctx, name)
        yield [name], command
        if isinstance(command, click.Group):
            for sub in command.list_commands(ctx):
                yield [name, sub], command.get_command(ctx, sub)


def test_every_help_ends_with_examples_and_documents_exit_codes():
    from click.testing import CliRunner

    from biofed.apps.cli import cli

    runner = CliRunner()
    for path, _ in _all_commands():
        text = runner.invoke(cli, [*path, "--help"]).output
        tail = text.rstrip().split("\n\n")[-1].splitlines()
        assert tail[0].strip() == "Examples:", (path, text[-400:])
        examples = [line.strip() for line in tail[1:]]
        assert examples and any(" ".join(["biofed", *path]) in line for line in examples), (path, examples)
        assert "Exit codes:" in text, path
    top = runner.invoke(cli, ["--help"]).output
    assert "Exit codes: 0 success; 1 runtime error; 2 usage error" in top and "_BIOFED_COMPLETE" in top


def test_same_option_names_mean_the_same_thing():
    import click

    for path, command in _all_commands():
        for param in command.params:
            if "--config" in param.opts:
                assert "biofed" in param.help and "TOML" in param.help, path
            if "--out" in param.opts:
                assert isinstance(param.type, click.Path) and param.help, path
                kind = "folder" if not param.type.file_okay else "file" if not param.type.dir_okay else None
                assert kind is not None and (kind in param.help or (kind == "file" and "." in param.help)), (
                    path,
                    param.help,
                )
            if "--json" in param.opts and path != ["bench"]:
                assert param.is_flag, path


def test_long_running_commands_take_logging_options():
    import click

    from biofed.apps.cli import cli

    ctx = click.Context(cli)
    for name in ("coordinator", "edge", "broker", "demo", "simulate", "audit", "play"):
        opts = {o for p in cli.get_command(ctx, name).params for o in p.opts}
        assert {"--log-level", "--log-format", "--log-file"} <= opts, name


def test_json_log_lines_to_a_file(tmp_path):
    import json
    import logging

    from biofed.cli_options import configure_logging

    log = tmp_path / "biofed.log"
    try:
        configure_logging("info", "json", log)
        logging.getLogger("biofed.test").info("round %d closed", 3)
        logging.getLogger("biofed.test").debug("not shown at info")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("biofed.test").exception("failed")
    finally:
        configure_logging("warning")
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["level"], e["logger"], e["message"]) for e in entries] == [
        ("info", "biofed.test", "round 3 closed"),
        ("error", "biofed.test", "failed"),
    ]
    assert "ValueError: boom" in entries[1]["exception"] and entries[0]["time"].endswith("Z")


def test_a_missing_config_file_is_a_usage_error(tmp_path):
    from click.testing import CliRunner

    from biofed.apps.cli import cli

    missing = str(tmp_path / "absent.toml")
    for command in (["coordinator"], ["edge"], ["status"]):
        result = CliRunner().invoke(cli, [*command, "--config", missing])
        assert result.exit_code == 2, (command, result.output)
        assert "config file not found" in result.output
