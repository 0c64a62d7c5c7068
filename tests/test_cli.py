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

    from biofed.cli import COMMANDS, cli

    runner = CliRunner()
    for name in COMMANDS:
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
