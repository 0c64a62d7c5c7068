"""The ``biofed`` command line.

Each sub-command lives in the module that owns its feature and is imported only when it
is run, so ``biofed --help`` stays fast on a Raspberry Pi (no Numba or MNE import).
"""

from __future__ import annotations

import ast
import importlib
import logging
import sys

import click

from biofed import __version__

# name -> "module:attribute" of a click.Command. One line per command; keep sorted.
COMMANDS: dict[str, str] = {
    "audit": "biofed.apps.audit:audit_command",
    "bench": "biofed.apps.bench:bench_command",
    "broker": "biofed.apps.broker:broker_command",
    "config": "biofed.apps.config_cli:config_command",
    "coordinator": "biofed.coordinator.cli:coordinator_command",
    "demo": "biofed.apps.demo:demo_command",
    "edge": "biofed.edge.cli:edge_command",
    "evaluate": "biofed.apps.evaluation:evaluate_command",
    "export": "biofed.coordinator.export_cli:export_command",
    "play": "biofed.edge.live_cli:play_command",
    "predict": "biofed.edge.predict_cli:predict_command",
    "privacy": "biofed.coordinator.privacy_cli:privacy_command",
    "provision": "biofed.apps.provision:provision_command",
    "replay": "biofed.edge.replay_cli:replay_command",
    "simulate": "biofed.apps.simulate:simulate_command",
    "status": "biofed.apps.status:status_command",
    "warmup": "biofed.edge.warmup:warmup_command",
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
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise click.ClickException(
                f"'biofed {cmd_name}' needs {exc.name or 'a package'} that is not installed: install the extra it "
                'belongs to, e.g. pip install "biofed[edge]" on a device or "biofed[coordinator]" for the coordinator.'
            ) from None
        return getattr(module, attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List the commands with the first docstring line of each, read from source without importing it."""
        rows = [(name, _summary(COMMANDS[name])) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _source_file(module_name: str) -> str | None:
    """The file of a module, found through the import system without importing its packages
    (``importlib.util.find_spec`` would run ``biofed/edge/__init__.py``, which imports Numba)."""
    search_path = None
    spec = None
    parts = module_name.split(".")
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        spec = next(
            (
                found
                for finder in sys.meta_path
                if hasattr(finder, "find_spec") and (found := finder.find_spec(name, search_path)) is not None
            ),
            None,
        )
        if spec is None:
            return None
        search_path = spec.submodule_search_locations
    return spec.origin


def _summary(target: str) -> str:
    """First docstring line of the function behind ``"module:attribute"`` (a click command), or ""."""
    module_name, attribute = target.split(":")
    origin = _source_file(module_name)
    if origin is None:
        return ""
    with open(origin, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == attribute:
            doc = ast.get_docstring(node) or ""
            return doc.strip().splitlines()[0] if doc.strip() else ""
    return ""


EPILOG = """\b
Every command: `biofed COMMAND --help` ends with examples; --config is a biofed TOML file,
--out a path (file or folder, as the command says), --json prints JSON on stdout.
Exit codes: 0 success; 1 runtime error; 2 usage error (bad option, missing or invalid config).
Shell completion (bash): eval "$(_BIOFED_COMPLETE=bash_source biofed)"   (zsh_source, fish_source)

\b
Examples:
  biofed demo
  biofed config init coordinator --out coordinator.toml
  biofed status --config coordinator.toml --watch"""


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.version_option(__version__, prog_name="biofed")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """biofed: privacy-preserving federated learning on edge biosensor devices."""
    ctx.ensure_object(dict)["verbose"] = verbose  # long-running commands honour it (cli_options)
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def main() -> None:
    """Console-script entry point."""
    cli()
