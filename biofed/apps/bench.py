"""``biofed bench``: run the benchmark suite (:mod:`biofed.benchmarks`) and print (and optionally save) the results."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from types import ModuleType

import click

import biofed
from biofed.cli_options import examples

logger = logging.getLogger(__name__)


def load_suite() -> ModuleType:
    """Import the benchmark suite, :mod:`biofed.benchmarks.suite`.

    Raises
    ------
    click.ClickException
        When a dependency of the suite is not installed; the message names it and the extra
        that provides it.
    """
    try:
        from biofed.benchmarks import suite
    except ImportError as exc:
        missing = exc.name or str(exc)
        raise click.ClickException(
            f"the benchmark suite needs {missing}, which is not installed: install biofed with its "
            'coordinator extra (`pip install "biofed[coordinator]"`).'
        ) from exc
    return suite


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}"


def _fmt_ratio(value: float) -> str:
    if not math.isfinite(value):
        return "inf"
    return f"{value:.3g}x" if value < 1000 else f"{value:,.0f}x"


def _fmt_diff(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def format_report(results, targets) -> str:
    """The human-readable table: comparisons, other metrics, errors and the targets."""
    lines: list[str] = []
    comparisons = [c for result in results for c in result.comparisons]
    if comparisons:
        header = (
            f"{'case':<22} {'shape':<30} {'biofed ms med [min-max]':<26} {'baseline':<32} "
            f"{'baseline ms med [min-max]':<26} {'ratio':>9} {'max rel diff':>13} {'1st call s':>10}"
        )
        lines += [
            "Timings in ms (ratio = baseline median / biofed median; 1st call = biofed warm-up call: "
            "Numba compilation or cache load, excluded from the timings)",
            header,
            "-" * len(header),
        ]
    for c in comparisons:
        b, r = c.biofed, c.baseline
        flag = "  << FLAG: outputs differ" if c.flagged else ""
        lines.append(
            f"{c.case:<22} {c.shape:<30} {_ms(b.median) + ' [' + _ms(b.min) + '-' + _ms(b.max) + ']':<26} "
            f"{c.baseline_name:<32} {_ms(r.median) + ' [' + _ms(r.min) + '-' + _ms(r.max) + ']':<26} "
            f"{_fmt_ratio(c.ratio):>9} {_fmt_diff(c.rel_diff):>13} {b.first_call:>10.3f}{flag}"
        )
        if c.note:
            lines.append(f"{'':<22} note: {c.note}")
    metrics = [m for result in results for m in result.metrics]
    if metrics:
        lines += ["", "Other measurements", "-" * 60]
        for m in metrics:
            lines.append(f"{m.case:<16} {m.name:<62} {m.value:>12.8g} {m.unit}")
    for table in (t for result in results for t in result.tables):
        lines += ["", table.format()]
    errors = [r for r in results if r.error]
    if errors:
        lines += ["", "Errors", "-" * 60]
        for r in errors:
            lines.append(f"{r.name:<22} {r.error}")
    if targets:
        lines += [
            "",
            "Targets (reported, not asserted)",
            f"{'target':<72} {'measured':>12} {'goal':>12}  result",
            "-" * 106,
        ]
        for t in targets:
            lines.append(f"{t.name:<72} {t.measured:>12.6g} {t.goal:>12}  {'PASS' if t.passed else 'MISS'}")
    return "\n".join(lines)


def _json_safe(value):
    """Strict JSON: NumPy scalars (a case's ``np.bool_`` pass flag, ``np.float64`` figures) become
    Python ones, and non-finite floats (an infinite ratio, a missing value) become null."""
    import numpy as np

    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@click.command(
    "bench",
    epilog=examples(
        "biofed bench --quick",
        "biofed bench --only transform,chain --out bench.json",
        "biofed bench --quick --json > bench.json",
        exit_codes="Exit codes: 0 every case ran; 1 a case failed; 2 usage error (unknown case).",
    ),
)
@click.option("--quick", is_flag=True, help="Fewer repeats and smaller shapes (pipeline shapes kept); < 60 s.")
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="JSON file to write machine information and every result to.",
)
@click.option(
    "--json",
    "json_arg",
    is_flag=False,
    flag_value="-",
    default=None,
    metavar="",
    help="Print the JSON on stdout (the table goes to stderr). `--json FILE` is the older spelling of --out FILE.",
)
@click.option(
    "--only",
    "only",
    multiple=True,
    metavar="NAME",
    help="Run only these cases (repeat the option or separate names with commas).",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=None,
    help="Timed repeats per function (default: 5 with --quick, 20 otherwise).",
)
def bench_command(
    quick: bool, out_path: Path | None, json_arg: str | None, only: tuple[str, ...], repeats: int | None
) -> None:
    """Time every kernel and the fusion chain against MNE/SciPy/scikit-learn/NumPy baselines."""
    to_stdout = json_arg == "-"
    if json_arg is not None and not to_stdout:
        out_path = out_path or Path(json_arg)
    suite = load_suite()
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in suite.CASES]
    if unknown:
        raise click.BadParameter(
            f"unknown case(s) {', '.join(unknown)}; choose from: {', '.join(suite.CASES)}.", param_hint="--only"
        )
    settings = suite.Settings(quick=quick, repeats=repeats or (5 if quick else 20))
    selected = names or list(suite.CASES)
    started = time.perf_counter()
    results = []
    for name in selected:
        click.echo(f"running {name} ...", err=True)
        results.append(suite.run_case(name, settings))
    targets = [t for r in results for t in r.targets]
    click.echo(format_report(results, targets), err=to_stdout)
    elapsed = time.perf_counter() - started
    mode = "quick" if quick else "full"
    click.echo(f"\n{len(selected)} case(s) in {elapsed:.1f} s ({mode} run, {settings.repeats} repeats).", err=to_stdout)
    if out_path is not None or to_stdout:
        payload = {
            "biofed_version": biofed.__version__,
            "created_unix": time.time(),
            "mode": mode,
            "repeats": settings.repeats,
            "machine": suite.machine_info(),
            "cases": [r.to_dict() for r in results],
            "targets": [t.to_dict() for t in targets],
            "seconds": elapsed,
        }
        text = json.dumps(_json_safe(payload), indent=2, allow_nan=False)
        if to_stdout:
            click.echo(text)
        if out_path is not None:
            out_path.write_text(text, encoding="utf-8")
            click.echo(f"results written to {out_path}", err=to_stdout)
    failed = [r.name for r in results if r.error]
    if failed:
        raise click.ClickException(f"case(s) failed: {', '.join(failed)} (see Errors above; -vv for tracebacks).")
