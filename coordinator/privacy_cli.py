"""``biofed privacy``: plan a privacy budget without training."""

from __future__ import annotations

import json
import math

import click

from biofed.cli_options import examples

from biofed.coordinator.privacy import (
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


@click.command("privacy", epilog=examples(
    "biofed privacy --rounds 10 --noise-multiplier 2.0",
    "biofed privacy -T 20 -q 0.5 -e 8 --calibrate-with pld",
    "biofed privacy --rounds 10 --noise-multiplier 2.0 --json",
))
@click.option("--rounds", "-T", type=int, required=True, callback=_validated(check_rounds),
              help="Number of federated rounds (>= 1).")
@click.option("--sampling-rate", "-q", type=float, default=1.0, show_default=True,
              callback=_validated(check_sampling_rate),
              help="Probability that each device is sampled into a round, in (0, 1].")
@click.option("--noise-multiplier", "-z", type=float, default=None, callback=_validated(check_noise_multiplier),
              help="Noise std on the sum of clipped updates divided by the clip norm (>= 0; 0 = no DP).")
@click.option("--delta", "-d", type=float, default=1e-5, show_default=True, callback=_validated(check_delta),
              help="Target delta in (0, 1); keep it below 1 / number of devices.")
@click.option("--target-epsilon", "-e", type=float, default=None, callback=_validated(_check_target_epsilon),
              help="Instead of --noise-multiplier: calibrate the smallest z reaching this epsilon.")
@click.option("--calibrate-with", type=click.Choice(["rdp", "pld"]), default="rdp", show_default=True,
              help="Accountant used by --target-epsilon (PLD is tighter but takes seconds).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (epsilon inf as the string \"inf\").")
def privacy_command(
    rounds: int, sampling_rate: float, noise_multiplier: float | None, delta: float,
    target_epsilon: float | None, calibrate_with: str, as_json: bool,
) -> None:
    """Client-level epsilon of a DP federated training plan (RDP and PLD), without training.

    One record is one device's whole contribution; each round is a Poisson-sampled
    Gaussian mechanism accounted with Google's dp_accounting.
    """
    if (noise_multiplier is None) == (target_epsilon is None):
        raise click.UsageError("give exactly one of --noise-multiplier and --target-epsilon.")
    if target_epsilon is not None:
        noise_multiplier = calibrate_noise_multiplier(
            target_epsilon, rounds, sampling_rate, delta, accountant=calibrate_with
        )
        if not as_json:
            click.echo(
                f"calibrated noise multiplier ({calibrate_with.upper()}, target epsilon {target_epsilon:g}): "
                f"{noise_multiplier:.6f}"
            )
    eps = plan_epsilon(rounds, sampling_rate, noise_multiplier, delta)
    if as_json:
        click.echo(json.dumps({
            "rounds": rounds, "sampling_rate": sampling_rate, "noise_multiplier": noise_multiplier, "delta": delta,
            "target_epsilon": target_epsilon, "calibrated_with": None if target_epsilon is None else calibrate_with,
            "epsilon": {name: value if math.isfinite(value) else str(value) for name, value in eps.items()},
        }))
        return
    click.echo(f"rounds={rounds} sampling_rate={sampling_rate:g} noise_multiplier={noise_multiplier:g} delta={delta:g}")
    click.echo(f"epsilon (RDP): {_format_epsilon(eps['rdp'])}")
    click.echo(f"epsilon (PLD): {_format_epsilon(eps['pld'])}")
