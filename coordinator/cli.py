"""``biofed coordinator --config coordinator.toml``: run the federation's coordinator."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import click

from biofed.cli_options import (
    ConfigUsageError,
    config_option,
    examples,
    load_config_or_exit,
    logging_options,
    override_options,
)
from biofed.config import CoordinatorConfig
from biofed.coordinator.server import Coordinator, CoordinatorError, RunState
from biofed.coordinator.state import RoundRecord, StateError


def _round_line(record: RoundRecord) -> str:
    """One line per closed round. The accuracy a round reports is the devices' held-out
    balanced accuracy of the model they *received*: the model after the previous training
    round (model 0: the initial one), which is how ``biofed demo``'s table labels it."""

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    label = record.phase if record.train_round is None else f"train {record.train_round}"
    eps = fmt(record.epsilon_rdp if record.epsilon_rdp is not None else record.epsilon_pld, ".3f")
    pld = "" if record.epsilon_pld is None else f" (pld {record.epsilon_pld:.3f})"
    if record.balanced_accuracy is None:
        accuracy = ""
    else:
        model = (
            "final model"
            if record.phase == "evaluate"
            else f"model {record.train_round - 1}"
            if record.train_round is not None
            else "current model"
        )
        accuracy = f"  balanced acc of {model} {record.balanced_accuracy:.3f}"
    return (
        f"round {record.round:4d} {label:<12} devices {record.n_devices}/{record.n_selected}  "
        f"loss {fmt(record.mean_loss, '.4f')}{accuracy}  epsilon {eps}{pld}"
    )


@click.command(
    "coordinator",
    epilog=examples(
        "biofed coordinator --config coordinator.toml",
        "biofed coordinator --config coordinator.toml --metrics-port 9100 --log-format json --log-file coordinator.log",
        "BIOFED_DP_EPSILON_BUDGET=8 biofed coordinator --config coordinator.toml --rounds 20",
    ),
)
@config_option("coordinator")
@override_options(CoordinatorConfig)
@click.option(
    "--discovery-timeout",
    type=click.FloatRange(min=0),
    default=300.0,
    show_default=True,
    help="Seconds to wait for min_devices online devices before giving up (0: wait forever).",
)
@click.option(
    "--max-retries",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Re-runs of a round with fewer than min_devices replies before aborting.",
)
@logging_options()
def coordinator_command(config_path: Path, overrides: dict, discovery_timeout: float, max_retries: int) -> None:
    """Run the coordinator of a fleet until all rounds ran (Ctrl-C stops it; rerun to resume).

    One coordinator runs per state_dir: a second one on the same directory exits with an
    error. Settings come from the command line, then BIOFED_* variables, then the file.
    """
    config = load_config_or_exit(config_path, CoordinatorConfig, overrides)
    try:
        coordinator = Coordinator(
            config,
            discovery_timeout_s=discovery_timeout or None,
            max_retries=max_retries,
            on_round=lambda record: click.echo(_round_line(record)),
        )
    except CoordinatorError as exc:
        raise ConfigUsageError(f"{config_path}: {exc}") from None

    def _stop(signum: int, frame: object) -> None:
        click.echo(f"received {signal.Signals(signum).name}: stopping after the current step", err=True)
        coordinator.stop()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGTERM, _stop)
    metrics = "" if config.metrics.port is None else f", metrics on {config.metrics.host}:{config.metrics.port}"
    click.echo(
        f"coordinator for fleet {config.fleet} on {config.broker.host}:{config.broker.port}, "
        f"state in {config.state_dir}{metrics}"
    )
    try:
        state = coordinator.run()
    except (CoordinatorError, StateError) as exc:
        raise click.ClickException(str(exc)) from None
    if state is RunState.DONE:
        eps = coordinator.epsilons()
        click.echo(
            f"done: final model in {config.state_dir / 'model_final.npz'}, "
            + ", ".join(f"epsilon {name} {value:.4g}" for name, value in eps.items())
            + f" at delta {config.dp.delta:g}"
        )
    elif state is RunState.ABORTED:
        raise click.ClickException("the coordinator aborted (see the log above; rerun with -v); rerun to resume")
    else:
        click.echo(f"coordinator {state.value}; rerun the same command to resume")
