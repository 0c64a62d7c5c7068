"""``biofed config init|check``: commented TOML templates of every config file, and a validator.

A template lists every setting of its model (:mod:`biofed.config`) with its default and
the field's documentation as a comment; the settings a user must choose carry a
placeholder, and ``[dp]`` carries the recommended privacy settings
(:data:`biofed.config.RECOMMENDED_PRIVACY`). Every template passes ``biofed config check``.
"""

from __future__ import annotations

import sys
import textwrap
import tomllib
import typing
from pathlib import Path

import click
from pydantic import BaseModel

from biofed.cli_options import examples
from biofed.config import (
    RECOMMENDED_PRIVACY,
    RECOMMENDED_ROUNDS,
    BrokerServiceConfig,
    ConfigError,
    CoordinatorConfig,
    DeviceConfig,
    env_name,
    load_config,
    toml_literal,
)

KINDS: dict[str, type[BaseModel]] = {
    "coordinator": CoordinatorConfig,
    "device": DeviceConfig,
    "broker": BrokerServiceConfig,
}
"""``biofed config init KIND`` -> the model of that file."""

_CHOSEN: dict[str, dict[str, object]] = {
    "coordinator": {
        "fleet": "ward7",
        "rounds": RECOMMENDED_ROUNDS,
        "min_devices": 2,
        "state_dir": "state",
        **{f"dp.{key}": value for key, value in RECOMMENDED_PRIVACY.items()},
    },
    "device": {
        "device_id": "pi-01",
        "fleet": "ward7",
        "store_path": "features.sqlite",
        "sources.kind": "lsl",
        "sources.name": "pi-01",
    },
    "broker": {},
}
"""Placeholders of the required settings and the recommended values that differ from a default."""

_HEADERS = {
    "coordinator": "biofed coordinator config: `biofed coordinator --config FILE`.",
    "device": "biofed device config: `biofed edge --config FILE`. Add the device's recordings.",
    "broker": "biofed broker config: `biofed broker --config FILE`.",
}


def _model_in(candidates) -> type[BaseModel] | None:
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def _section_model(annotation: object) -> type[BaseModel] | None:
    """The model of a ``[table]`` setting (a model, or a model or None)."""
    if typing.get_origin(annotation) in (tuple, list):
        return None
    return _model_in((annotation, *typing.get_args(annotation)))


def _array_model(annotation: object) -> type[BaseModel] | None:
    """The model of a ``[[array of tables]]`` setting (a tuple or list of a model)."""
    return _model_in(typing.get_args(annotation)) if typing.get_origin(annotation) in (tuple, list) else None


def _comment(text: str | None, indent: str = "") -> list[str]:
    if not text:
        return []
    paragraphs = [" ".join(p.split()) for p in text.strip().split("\n\n")]
    lines = []
    for paragraph in paragraphs:
        lines += textwrap.wrap(paragraph, 96, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ")
    return lines


def _table(
    model: type[BaseModel], prefix: str, chosen: dict[str, object], overridable: tuple[str, ...], *, commented: bool
) -> list[str]:
    """Lines of one table: its scalar settings, then its sub-tables (TOML needs that order)."""
    mark = "# " if commented else ""
    lines: list[str] = []
    sections = []
    arrays = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _section_model(info.annotation)
        if sub is not None:
            sections.append((key, sub, info))
            continue
        item = _array_model(info.annotation)
        if item is not None:  # none by default: one commented entry shows its keys
            arrays.append((key, item, info))
            continue
        lines.append("")
        lines += _comment(info.description)
        if key in overridable:
            lines.append(f"# (also {env_name(key)})")
        if key in chosen:
            value = chosen[key]
        elif info.is_required():
            raise ValueError(f"no placeholder for the required setting {key}")
        else:
            value = info.get_default(call_default_factory=True)
        if value is None:
            lines.append(f"# {key.rsplit('.', 1)[-1]} =   (not set by default)")
        else:
            lines.append(f"{mark}{name} = {toml_literal(value)}")
    for key, item, info in arrays:
        lines += ["", ""] + _comment(info.description or item.__doc__) + [f"# [[{key}]]"]
        for name, field in item.model_fields.items():
            lines += _comment(field.description)
            default = None if field.is_required() else field.get_default(call_default_factory=True)
            lines.append(
                f"# {name} = "
                + (
                    "...   (required)"
                    if field.is_required()
                    else "...   (not set by default)"
                    if default is None
                    else toml_literal(default)
                )
            )
    for key, sub, info in sections:
        if typing.get_origin(info.annotation) is tuple:  # an array of tables: one commented example entry
            lines += ["", ""] + _comment(info.description or sub.__doc__) + [f"# [[{key}]]"]
            lines += _table(sub, f"{key}.", chosen, overridable, commented=True)
            continue
        optional = info.default is None  # an optional section: shown commented out
        lines += ["", ""] + _comment(info.description or sub.__doc__)
        lines.append(f"{'# ' if commented or optional else ''}[{key}]")
        lines += _table(sub, f"{key}.", chosen, overridable, commented=commented or optional)
    return lines


def template(kind: str) -> str:
    """The commented TOML template of config ``kind`` ("coordinator", "device" or "broker")."""
    model = KINDS[kind]
    lines = _comment(_HEADERS[kind]) + _comment(
        "Every setting with its default; relative paths are relative to this file. "
        "`biofed config check FILE` validates it."
    )
    lines += _table(model, "", _CHOSEN[kind], getattr(model, "OVERRIDABLE", ()), commented=False)
    return "\n".join(lines).replace("\n\n\n\n", "\n\n\n") + "\n"


def detect_kind(path: Path) -> str:
    """Which config ``path`` is, from its keys (``device_id``: device; ``state_dir`` or
    ``rounds``: coordinator; only broker settings: broker)."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return "coordinator"  # load_config reports the problem
    if "device_id" in data:
        return "device"
    if "state_dir" in data or "rounds" in data or "fleet" in data:
        return "coordinator"
    if set(data) <= set(BrokerServiceConfig.model_fields):
        return "broker"
    raise click.UsageError(f"{path}: cannot tell which config this is; pass --kind coordinator|device|broker")


def check(path: Path, kind: str) -> str:
    """Validate ``path`` as a ``kind`` config the way its command loads it (``BIOFED_*``
    variables included); a coordinator config is also checked against the strategy, the
    privacy settings and its key and allow-list files. Returns a one-line summary.

    Raises
    ------
    ConfigError
        What is wrong, naming the file and each field.
    """
    config = load_config(path, KINDS[kind])
    if kind == "coordinator":
        from biofed.coordinator.server import Coordinator, CoordinatorError

        try:
            Coordinator(config)
        except CoordinatorError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        budget = config.dp.epsilon_budget
        return (
            f"{path}: valid coordinator config: fleet {config.fleet}, {config.rounds} rounds, "
            f"{config.dp.trust_mode} DP z={config.dp.noise_multiplier:g} C={config.dp.clip_norm:g}, "
            f"budget {'none' if budget is None else f'epsilon {budget:g}'} at delta {config.dp.delta:g}"
        )
    if kind == "device":
        missing = [str(p) for p in config.recordings if not p.exists()]
        note = f"; missing recordings: {', '.join(missing)}" if missing else ""
        return (
            f"{path}: valid device config: device {config.device_id} of fleet {config.fleet}, "
            f"{len(config.recordings)} recording(s){note}"
        )
    return f"{path}: valid broker config: {'mosquitto' if config.mosquitto else 'amqtt'} on {config.host}:{config.port}"


@click.group(
    "config",
    epilog=examples("biofed config init coordinator --out coordinator.toml", "biofed config check coordinator.toml"),
)
def config_command() -> None:
    """Write config templates and check config files."""


@config_command.command(
    "init",
    epilog=examples(
        "biofed config init coordinator > coordinator.toml",
        "biofed config init device --out pi-01/device.toml",
        "biofed config init broker --out broker.toml",
    ),
)
@click.argument("kind", type=click.Choice(sorted(KINDS)))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File to write (an existing file is not overwritten without --force) [default: stdout].",
)
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
def init_command(kind: str, out: Path | None, force: bool) -> None:
    """Print a commented TOML template of a KIND config with every setting and its default."""
    text = template(kind)
    if out is None:
        sys.stdout.write(text)
        return
    if out.exists() and not force:
        raise click.UsageError(f"{out} exists; pass --force to overwrite it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc}") from None
    click.echo(f"wrote {out}; check it with: biofed config check {out}", err=True)


@config_command.command(
    "check",
    epilog=examples(
        "biofed config check coordinator.toml",
        "biofed config check --kind device pi-01/device.toml",
        exit_codes="Exit codes: 0 valid; 1 invalid; 2 usage error (no such file, unknown kind).",
    ),
)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--kind",
    type=click.Choice(sorted(KINDS)),
    default=None,
    help="Which config FILE is [default: guessed from its keys].",
)
def check_command(file: Path, kind: str | None) -> None:
    """Validate FILE (BIOFED_* environment overrides applied, as the command would load it)."""
    try:
        click.echo(check(file, kind or detect_kind(file)))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


__all__ = ["KINDS", "check", "config_command", "detect_kind", "template"]
