"""``biofed edge --config device.toml``: run one device agent until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import click

__all__ = ["edge_command"]

logger = logging.getLogger(__name__)


@click.command("edge")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Device config (TOML, see biofed.config.DeviceConfig).")
def edge_command(config_path: Path) -> None:
    """Run an edge device: ingest its recordings, then answer federated tasks over MQTT.

    The agent replays the configured recordings into its feature store (files already
    ingested are skipped), connects to the broker with a persistent session and answers
    the coordinator's basis, training and evaluation tasks. SIGTERM or Ctrl-C publishes
    an "offline" status and exits cleanly.
    """
    from biofed.config import ConfigError, DeviceConfig, load_config
    from biofed.edge.agent import EdgeAgent
    from biofed.edge.store import StoreError

    try:
        config = load_config(config_path, DeviceConfig)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        agent = EdgeAgent(config)
    except StoreError as exc:
        raise click.ClickException(f"cannot open the feature store: {exc}") from None
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        logger.info("%s: received %s, shutting down", config.device_id, signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        agent.run(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        agent.close()
