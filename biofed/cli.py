"""The ``biofed`` command line.

Each sub-command lives in the module that owns its feature and is imported only when it
is run, so ``biofed --help`` stays fast on a Raspberry Pi (no Numba or MNE import).
"""

from __future__ import annotations

import importlib
import logging

import click

from biofed import __version__

# name -> "module:attribute" of a click.Command. One line per command; keep sorted.
COMMANDS: dict[str, str] = {
    "bench": "biofed.bench:bench_command",
    "broker": "biofed.broker:broker_command",
    "coordinator": "biofed.coordinator.cli:coordinator_command",
    "demo": "biofed.demo:demo_command",
    "edge": "biofed.edge.cli:edge_command",
    "export": "biofed.coordinator.export_cli:export_command",
    "predict": "biofed.edge.predict_cli:predict_command",
    "privacy": "biofed.coordinator.privacy_cli:privacy_command",
    "provision": "biofed.provision:provision_command",
    "replay": "biofed.edge.replay_cli:replay_command",
    "simulate": "biofed.simulate:simulate_command",
}


class LazyGroup(click.Group):
    """A click group that imports a sub-command's module only when that command runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        return getattr(importlib.import_module(module_name), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="biofed")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """biofed: privacy-preserving federated learning on edge biosensor devices."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def main() -> None:
    """Console-script entry point."""
    cli()
