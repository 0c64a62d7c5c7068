"""The conventions every ``biofed`` command follows, as reusable click pieces.

- ``--config`` is always a biofed TOML file (:func:`config_option`); a missing or invalid
  one is a usage error (:class:`ConfigUsageError`, exit code 2).
- ``--out`` is always a path; each command's help says whether it is a file or a folder.
- ``--json`` makes a reporting command print one JSON document on stdout.
- Long-running commands take ``--log-level``, ``--log-format text|json`` and
  ``--log-file`` (:func:`logging_options`).
- The settings of a config model's ``OVERRIDABLE`` have an option each
  (:func:`override_options`): command line > ``BIOFED_*`` environment > file > default.
- Every ``--help`` ends with examples (:func:`examples`).
- Exit codes: 0 success, 1 runtime error, 2 usage error (:data:`EXIT_CODES`).
"""

from __future__ import annotations

import functools
import json
import logging
import logging.handlers
import re
import sys
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path

import click

EXIT_CODES = (
    "Exit codes: 0 success; 1 runtime error (broker unreachable, aborted run, failed check); "
    "2 usage error (bad option, missing or invalid config file)."
)

LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"


class ConfigUsageError(click.ClickException):
    """A config file is missing or invalid: the user's input is wrong (exit code 2)."""

    exit_code = 2


def examples(*lines: str, exit_codes: str | None = EXIT_CODES) -> str:
    """A command epilog: the exit codes, then example invocations (kept as they are), last."""
    listing = "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)
    return listing if exit_codes is None else f"{exit_codes}\n\n{listing}"


def config_option(kind: str, *, required: bool = True) -> Callable:
    """``--config FILE``: the command's biofed TOML file (``biofed config init KIND`` writes one)."""
    return click.option(
        "--config",
        "config_path",
        required=required,
        type=click.Path(dir_okay=False, path_type=Path),
        help=f"biofed {kind} config (TOML; `biofed config init {kind}` writes a template).",
    )


def load_config_or_exit(path: Path, model: type, overrides: dict | None = None):
    """:func:`biofed.config.load_config`, with a missing or invalid file as exit code 2."""
    from biofed.config import ConfigError, load_config

    try:
        return load_config(path, model, overrides=overrides)
    except ConfigError as exc:
        raise ConfigUsageError(str(exc)) from None


# ----------------------------------------------------------------------------- logging
class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message[, exception]."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str = "info", log_format: str = "text", log_file: Path | None = None) -> None:
    """Send biofed's log records at ``level`` and above (other libraries' from WARNING, all of
    them at ``debug``) to stderr, or to ``log_file`` (appended; reopened when logrotate moves it)."""
    numeric = getattr(logging, level.upper())
    handler: logging.Handler
    if log_file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        try:
            handler = logging.handlers.WatchedFileHandler(log_file)
        except OSError as exc:
            raise click.BadParameter(f"cannot open {log_file}: {exc}", param_hint="--log-file") from None
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_LOG_FORMAT))
    logging.basicConfig(level=min(numeric, logging.WARNING), handlers=[handler], force=True)
    logging.getLogger("biofed").setLevel(numeric)


def logging_options(default_level: str = "info") -> Callable:
    """Add ``--log-level``, ``--log-format``, ``--log-file`` and ``-v`` to a long-running command
    and configure logging before it runs. ``-v`` (here or on ``biofed``) means debug."""

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def run(*args, log_level: str | None, log_format: str, log_file: Path | None, verbose: int, **kwargs):
            group_verbose = (click.get_current_context().find_root().obj or {}).get("verbose", 0)
            if log_level is None:
                log_level = "debug" if verbose or group_verbose > 1 else default_level
            configure_logging(log_level, log_format, log_file)
            return command(*args, **kwargs)

        for option in reversed(
            (
                click.option(
                    "--log-level",
                    type=click.Choice(LOG_LEVELS),
                    default=None,
                    help=f"Least severe log records shown [default: {default_level}; -v: debug].",
                ),
                click.option(
                    "--log-format",
                    type=click.Choice(["text", "json"]),
                    default="text",
                    show_default=True,
                    help="json: one JSON object per line (for journald, Loki, Elasticsearch).",
                ),
                click.option(
                    "--log-file",
                    type=click.Path(dir_okay=False, path_type=Path),
                    default=None,
                    help="Append the log to this file instead of stderr (logrotate-safe).",
                ),
                click.option("-v", "--verbose", count=True, help="Debug logging (same as --log-level debug)."),
            )
        ):
            run = option(run)
        return run

    return decorate


# ----------------------------------------------------------------------------- overrides
def option_name(key: str) -> str:
    """The command-line option of a dotted setting: ``dp.clip_norm`` -> ``--clip-norm`` (the
    privacy settings keep the names ``biofed demo`` and ``biofed privacy`` use),
    ``broker.host`` -> ``--broker-host``."""
    if key.startswith("dp."):
        key = key[3:]
    return "--" + key.replace(".", "-").replace("_", "-")


def _click_type(annotation: object) -> click.ParamType:
    args = (
        typing.get_args(annotation)
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
        else (annotation,)
    )
    kinds = {
        typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a for a in args if a is not type(None)
    }
    if kinds == {int}:
        return click.INT
    if kinds == {float}:
        return click.FLOAT
    if kinds == {bool}:
        return click.BOOL
    if kinds and all(isinstance(a, type) and issubclass(a, Path) for a in kinds):
        return click.Path(path_type=Path)
    return click.STRING


def override_options(model: type, *, aliases: dict[str, str] | None = None) -> Callable:
    """One option per setting of ``model.OVERRIDABLE``, passed to the command as ``overrides``
    (``{dotted key: value or None}``) for :func:`biofed.config.load_config`. ``aliases`` maps
    a key to a former option spelling that keeps working (hidden from ``--help``)."""
    from biofed.config import env_name

    aliases = aliases or {}
    keys = model.OVERRIDABLE

    def field(key: str):
        current = model
        *sections, leaf = key.split(".")
        for section in sections:
            current = current.model_fields[section].annotation
        return current.model_fields[leaf]

    def decorate(command: Callable) -> Callable:
        params = {key: option_name(key).lstrip("-").replace("-", "_") for key in keys}

        @functools.wraps(command)
        def run(*args, **kwargs):
            overrides = {key: kwargs.pop(name) for key, name in params.items()}
            for key in aliases:
                value = kwargs.pop(f"alias_{params[key]}")
                if overrides[key] is None:
                    overrides[key] = value
            return command(*args, overrides=overrides, **kwargs)

        for key in reversed(keys):
            info = field(key)
            name = option_name(key)
            short = re.split(r"(?<!e\.g)\. |; ", " ".join((info.description or "").split()))[0].rstrip(".")
            short = f"{short}." if short and len(short) <= 90 else ""
            kind = _click_type(info.annotation)
            help_text = f"Override {key} ({env_name(key)}). {short}".strip()
            if kind is click.BOOL:  # a flag pair, so that "not given" stays None
                run = click.option(f"{name}/--no-{name[2:]}", params[key], default=None, help=help_text)(run)
            else:
                run = click.option(name, params[key], type=kind, default=None, help=help_text)(run)
            if key in aliases:
                run = click.option(
                    aliases[key], f"alias_{params[key]}", type=_click_type(info.annotation), default=None, hidden=True
                )(run)
        return run

    return decorate


__all__ = [
    "ConfigUsageError",
    "EXIT_CODES",
    "JsonFormatter",
    "LOG_LEVELS",
    "config_option",
    "configure_logging",
    "examples",
    "load_config_or_exit",
    "logging_options",
    "option_name",
    "override_options",
]
