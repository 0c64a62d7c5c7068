"""``biofed privacy``: plan a privacy budget without training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from biofed.cli_options import examples
from biofed.privacy_ledger import (
    calibrate_noise_multiplier,
    check_delta,
    check_noise_multiplier,
    check_rounds,
    check_sampling_rate,
    plan_epsilon,
)


def _validated(check):
    """A click callback running one of the privacy validators, as a BadParameter on failure."""

    def callback(ctx: click.Context, param: click.Parameter, value):
        if value is None:
            return None
        try:
            return check(value)
        except (TypeError, ValueError) as err:
            raise click.BadParameter(str(err), ctx=ctx, param=param) from None

    return callback


def _check_target_epsilon(value) -> float:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"target epsilon must be a finite number > 0, got {value!r}.")
    return value


def _format_epsilon(eps: float) -> str:
    return "inf (no noise: no differential privacy)" if math.isinf(eps) else f"{eps:.6f}"


@click.command(
    "privacy",
    epilog=examples(
        "biofed privacy --rounds 10 --noise-multiplier 2.0",
        "biofed privacy -T 20 -q 0.5 -e 8 --calibrate-with pld",
        "biofed privacy --rounds 10 --noise-multiplier 2.0 --json",
        "biofed privacy --level record -T 20 -q 0.05 -z 1.1   # DP-SGD on a ward device",
        "biofed privacy --config coordinator.toml   # every release of a configured run",
    ),
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A `biofed coordinator` TOML config: plan every release its run makes (the basis phase(s), the "
    "one-shot class statistics, the training rounds, each with its own noise multiplier) instead of -T/-z.",
)
@click.option(
    "--rounds",
    "-T",
    type=int,
    default=None,
    callback=_validated(check_rounds),
    help="Number of federated rounds (>= 1; required without --config).",
)
@click.option(
    "--sampling-rate",
    "-q",
    type=float,
    default=1.0,
    show_default=True,
    callback=_validated(check_sampling_rate),
    help="Probability that each device is sampled into a round, in (0, 1].",
)
@click.option(
    "--noise-multiplier",
    "-z",
    type=float,
    default=None,
    callback=_validated(check_noise_multiplier),
    help="Noise std on the sum of clipped updates divided by the clip norm (>= 0; 0 = no DP).",
)
@click.option(
    "--delta",
    "-d",
    type=float,
    default=1e-5,
    show_default=True,
    callback=_validated(check_delta),
    help="Target delta in (0, 1); keep it below 1 / number of devices.",
)
@click.option(
    "--target-epsilon",
    "-e",
    type=float,
    default=None,
    callback=_validated(_check_target_epsilon),
    help="Instead of --noise-multiplier: calibrate the smallest z reaching this epsilon.",
)
@click.option(
    "--calibrate-with",
    type=click.Choice(["rdp", "pld"]),
    default="rdp",
    show_default=True,
    help="Accountant used by --target-epsilon (PLD is tighter but takes seconds).",
)
@click.option(
    "--level",
    type=click.Choice(["client", "record"]),
    default="client",
    show_default=True,
    help="client: one record is a device's whole contribution to a round (the coordinator's ledger; "
    "-q is the device sampling rate, 1 for biofed's public cohorts). record: one record is one "
    "window, protected by DP-SGD on the device ([dp] record_* of the device config; -q is "
    "record_sampling_rate, -z record_noise_multiplier).",
)
@click.option("--json", "as_json", is_flag=True, help='Print one JSON object (epsilon inf as the string "inf").')
@click.option(
    "--steps-per-round",
    type=int,
    default=None,
    help="--level record: DP-SGD steps per round (default ceil(1 / q), one expected epoch).",
)
def privacy_command(
    config_file: Path | None,
    rounds: int | None,
    sampling_rate: float,
    noise_multiplier: float | None,
    delta: float,
    target_epsilon: float | None,
    calibrate_with: str,
    as_json: bool,
    level: str,
    steps_per_round: int | None,
) -> None:
    """Client-level or record-level epsilon of a DP training plan (RDP and PLD), without training.

    Client level: one record is one device's whole contribution; each round is a
    Poisson-sampled Gaussian mechanism. Record level: one record is one window; each DP-SGD
    step of each round is one. Both are accounted with Google's dp_accounting. With
    --config, the plan of a coordinator config's whole run, every release counted.
    """
    if config_file is not None:
        _plan_config(config_file, as_json)
        return
    if rounds is None:
        raise click.UsageError("give --rounds (or --config with a coordinator config).")
    if level == "client" and steps_per_round is not None:
        raise click.UsageError("--steps-per-round applies to --level record only.")
    if steps_per_round is not None and steps_per_round < 1:
        raise click.BadParameter(f"must be an integer >= 1, got {steps_per_round}.", param_hint="--steps-per-round")
    events = rounds
    if level == "record":
        steps_per_round = steps_per_round or math.ceil(1.0 / sampling_rate)
        events = rounds * steps_per_round
    if (noise_multiplier is None) == (target_epsilon is None):
        raise click.UsageError("give exactly one of --noise-multiplier and --target-epsilon.")
    if target_epsilon is not None:
        noise_multiplier = calibrate_noise_multiplier(
            target_epsilon, events, sampling_rate, delta, accountant=calibrate_with
        )
        if not as_json:
            click.echo(
                f"calibrated noise multiplier ({calibrate_with.upper()}, target epsilon {target_epsilon:g}): "
                f"{noise_multiplier:.6f}"
            )
    eps = plan_epsilon(events, sampling_rate, noise_multiplier, delta)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "level": level,
                    "rounds": rounds,
                    "steps_per_round": steps_per_round,
                    "sampling_rate": sampling_rate,
                    "noise_multiplier": noise_multiplier,
                    "delta": delta,
                    "target_epsilon": target_epsilon,
                    "calibrated_with": None if target_epsilon is None else calibrate_with,
                    "epsilon": {name: value if math.isfinite(value) else str(value) for name, value in eps.items()},
                }
            )
        )
        return
    steps = "" if level == "client" else f" steps_per_round={steps_per_round}"
    click.echo(
        f"rounds={rounds}{steps} sampling_rate={sampling_rate:g} noise_multiplier={noise_multiplier:g} delta={delta:g}"
    )
    click.echo(f"{level}-level epsilon (RDP): {_format_epsilon(eps['rdp'])}")
    click.echo(f"{level}-level epsilon (PLD): {_format_epsilon(eps['pld'])}")


def _plan_config(path: Path, as_json: bool) -> None:
    """Print the releases and the planned epsilon of a run of the coordinator config at ``path``."""
    from biofed.config import ConfigError, CoordinatorConfig, load_config
    from biofed.coordinator.phases import compose_rounds, planned_epsilons, planned_releases

    try:
        config = load_config(path, CoordinatorConfig)
        settings = compose_rounds(config).settings
    except (ConfigError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    releases = planned_releases(config, settings)
    eps = planned_epsilons(config, settings)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "config": str(path),
                    "algorithm": settings.algorithm,
                    "releases": [{"kind": kind, "noise_multiplier": z} for kind, z in releases],
                    "delta": config.dp.delta,
                    "epsilon_budget": config.dp.epsilon_budget,
                    "epsilon": {name: value if math.isfinite(value) else str(value) for name, value in eps.items()},
                }
            )
        )
        return
    counts: dict[tuple[str, float], int] = {}
    for release in releases:
        counts[release] = counts.get(release, 0) + 1
    click.echo(f"{path}: algorithm {settings.algorithm}, trust mode {settings.trust_mode}, every device every round")
    for (kind, z), n in counts.items():
        click.echo(f"  {n} x {kind} release, noise multiplier {z:g}")
    click.echo(f"client-level epsilon (RDP): {_format_epsilon(eps['rdp'])} at delta {config.dp.delta:g}")
    click.echo(f"client-level epsilon (PLD): {_format_epsilon(eps['pld'])} at delta {config.dp.delta:g}")
    budget = config.dp.epsilon_budget
    if budget is not None and eps[config.dp.accountant] > budget:
        click.echo(
            f"the plan exceeds dp.epsilon_budget = {budget:g}: training stops before the round that would cross it"
        )
