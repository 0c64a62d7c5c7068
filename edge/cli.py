"""``biofed edge --config device.toml``: run one device agent until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import click

from biofed.cli_options import config_option, examples, load_config_or_exit, logging_options, override_options
from biofed.config import DeviceConfig

__all__ = ["edge_command"]

logger = logging.getLogger(__name__)

SOURCE_POLL_S = 5.0
"""How often an agent that waits for its sources (``wait_for_sources``) looks again."""


def _wait_for_sources(
    agent, config: DeviceConfig, stop: threading.Event, wait: bool, before_ingest: Callable[[], None]
) -> bool:
    """True once the agent has something to learn from: windows in its store (the
    recordings are ingested here first, in fast replay), a live source or watched folder
    (they deliver while the agent serves), or, in real-time replay (which ingests while
    serving), a recording that exists.

    Without ``wait`` an agent with nothing to learn from fails at once instead of sitting
    "online with 0 windows"; with it (a service started before its data) it retries every
    :data:`SOURCE_POLL_S` seconds until stopped. ``before_ingest`` runs before recordings
    that exist are ingested here.
    """
    from biofed.edge.continuous import ContinuousIngestion
    from biofed.edge.ingestion import recording_files

    if ContinuousIngestion.needed(config):
        return True
    while not stop.is_set():
        files = recording_files(config)
        if config.replay_speed == 0:
            if any(p.exists() for p in files):
                before_ingest()
            agent.ingest(stop)
        if agent.n_rows or (config.replay_speed > 0 and any(p.exists() for p in files)):
            return True
        missing = [str(p) for p in files if not p.exists()]
        if not files:
            problem = 'no recordings configured (add recordings = ["data/s01_1.edf", ...] or [[sources]] to the config)'
        elif missing:
            problem = f"recordings not found: {', '.join(missing)}"
        else:
            problem = "no recording gave a feature window (see the errors above)"
        if not wait:
            raise click.ClickException(
                f"{config.device_id}: no usable source: {problem}; the agent has nothing to train on. Fix the "
                "config, or pass --wait-for-sources (wait_for_sources = true) to wait for the data"
            )
        logger.warning("%s: no usable source yet (%s); looking again in %g s", config.device_id, problem, SOURCE_POLL_S)
        stop.wait(SOURCE_POLL_S)
    return False


@click.command(
    "edge",
    epilog=examples(
        "biofed edge --config pi-01/device.toml",
        "biofed edge --config device.toml --metrics-port 9101 --log-format json --log-file agent.log",
        "BIOFED_BROKER_HOST=10.0.0.5 biofed edge --config device.toml",
        "biofed edge --config device.toml --wait-for-sources   # a service started before its data",
    ),
)
@config_option("device")
@override_options(DeviceConfig)
@click.option(
    "--wait-for-sources/--no-wait-for-sources",
    default=None,
    help="Wait for a usable recording instead of failing at once [default: wait_for_sources].",
)
@logging_options()
def edge_command(config_path: Path, overrides: dict, wait_for_sources: bool | None) -> None:
    """Run an edge device: ingest its recordings, then answer federated tasks over MQTT.

    The agent replays the configured recordings into its feature store (files already
    ingested are skipped), connects to the broker with a persistent session and answers
    the coordinator's basis, training and evaluation tasks. With no usable recording and
    an empty store it exits with an error (unless it waits for sources). SIGTERM or Ctrl-C
    publishes an "offline" status and exits within seconds, whatever the broker's state.
    """
    from biofed.edge.agent import EdgeAgent
    from biofed.edge.store import StoreError
    from biofed.edge.warmup import warmup_in_subprocess
    from biofed.metrics import serve

    config = load_config_or_exit(config_path, DeviceConfig, overrides)
    wait = config.wait_for_sources if wait_for_sources is None else wait_for_sources
    try:  # the CLI warms up itself (below), before it ingests
        agent = EdgeAgent(config.model_copy(update={"warmup": False}))
    except StoreError as exc:
        raise click.ClickException(f"cannot open the feature store: {exc}") from None
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        logger.info("%s: received %s, shutting down", config.device_id, signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    warmed_up = not config.warmup

    def warm_up_once() -> None:
        """The agent's warm-up child, before the first kernel runs in this process (the recordings'
        ingestion would otherwise compile there on a cold cache), and never for an agent that
        fails at once for want of a source."""
        nonlocal warmed_up
        if not warmed_up:
            warmed_up = True
            logger.info("%s: kernels warmed up in %.1f s", config.device_id, warmup_in_subprocess(stop))

    metrics_server = None
    try:
        try:
            metrics_server = serve(agent.metrics.registry, config.metrics)
        except OSError as exc:
            raise click.ClickException(f"[metrics] {exc}") from None
        if _wait_for_sources(agent, config, stop, wait, warm_up_once):
            warm_up_once()
            agent.run(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if metrics_server is not None:
            metrics_server.close()
        agent.close()
