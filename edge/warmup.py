"""Compile and cache every Numba kernel signature the device agent uses, before it goes online.

Numba compiles a kernel the first time it is called with a new signature; on a Raspberry Pi
that takes minutes for the whole agent, longer than a round deadline. The kernels are
``cache=True``: :func:`warmup` runs the agent's own code paths once on a short synthetic
multimodal recording, so every signature is compiled and written to Numba's on-disk cache
(``__pycache__`` beside the kernels, or ``NUMBA_CACHE_DIR``). Later processes load the
machine code from there instead of compiling.

The paths run are those of :class:`biofed.edge.agent.EdgeAgent`: streaming features of every
modality (EEG band powers, audio band energies, biosensor statistics and heart rate), the
feature store, the basis phases (moments, covariance with global and device
standardization), local training (SGD and Adam, linear and one hidden layer), evaluation,
clipping and Numba scoring of a model without ONNX bytes. Going through the agent rather than
calling the kernels one by one keeps the warmed signatures equal to the used ones (array
layouts, dtypes, read-only flags) whatever the kernels' internals become.

``biofed warmup`` runs it from the command line (e.g. as an install step or ``ExecStartPre``).
:meth:`EdgeAgent.run` runs it before the agent reports "online", in a child process
(:func:`warmup_in_subprocess`): the agent then loads from the cache only the signatures its
configuration calls, and a cold cache's compilation (LLVM's optimizer at several hundred MB)
never raises the agent's own peak memory.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import numpy as np

from biofed.cli_options import examples

__all__ = ["WarmupError", "warmup", "warmup_command", "warmup_in_subprocess"]

logger = logging.getLogger(__name__)

_CLASSES = ("rest", "arithmetic")
_FLEET = "warmup"
_STDERR_TAIL = 2000
_STOP_POLL_S = 0.2


class WarmupError(RuntimeError):
    """The warm-up child process failed."""


def warmup() -> float:
    """Run every agent code path once on synthetic data; return the wall seconds it took."""
    from biofed.config import DeviceConfig
    from biofed.datasets import make_recording, replay
    from biofed.edge.agent import EdgeAgent
    from biofed.edge.pipeline import StreamingPipeline
    from biofed.kernels import n_params
    from biofed.model import FeatureLayout, fit_basis
    from biofed.protocol import Basis, Model, Task

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="biofed-warmup-") as tmp:
        config = DeviceConfig(device_id="warmup", fleet=_FLEET, store_path=Path(tmp) / "features.sqlite", predict=True)
        agent = EdgeAgent(config, random_state=0)
        try:
            for i, label in enumerate(_CLASSES):
                recording = make_recording(
                    label, duration_s=12.0, eeg_channels=4, audio_sfreq=2000.0, subject="warmup", random_state=i
                )
                layout = FeatureLayout.from_recording(recording, agent.pipeline_config)
                agent.ingestion.bind(layout)
                pipeline = StreamingPipeline(agent.pipeline_config, layout)
                rows = []
                for chunk in replay(recording):
                    rows.extend(pipeline.push(chunk.modality, chunk.data, chunk.label))
                pipeline.flush()
                agent.ingestion.append(rows, agent.ingestion.next_offset(), f"warmup-{label}")
            deadline = time.time() + 3600
            for phase in ("moments", "covariance"):
                agent.answer(
                    Task(
                        round=1,
                        model=np.empty(0),
                        basis_version=0,
                        classes=_CLASSES,
                        deadline=deadline,
                        phase=phase,
                        clip_norm=1.0,
                        noise_multiplier=1.0,
                        trust_mode="local",
                    )
                )
            X, _, _ = agent.store.read()
            k = min(8, X.shape[1])
            fitted = fit_basis(X, k)
            version = 0
            for standardization in ("global", "device"):
                version += 1
                mean = fitted.mean if standardization == "global" else np.zeros(X.shape[1])
                scale = fitted.scale if standardization == "global" else np.ones(X.shape[1])
                agent.answer(
                    Basis(
                        round=1,
                        version=version,
                        components=fitted.components,
                        mean=mean,
                        scale=scale,
                        standardization=standardization,
                    )
                )
                for hidden in (0, 4):
                    model = np.zeros(n_params(k, len(_CLASSES), hidden))
                    for optimizer, prox_mu in (("sgd", 0.0), ("adam", 0.1)):
                        agent.answer(
                            Task(
                                round=version * 10 + hidden + len(optimizer),
                                model=model,
                                basis_version=version,
                                classes=_CLASSES,
                                deadline=deadline,
                                hidden=hidden,
                                optimizer=optimizer,
                                prox_mu=prox_mu,
                                adaptive_clipping=True,
                                trust_mode="local",
                                noise_multiplier=1.0,
                            )
                        )
                    agent.answer(
                        Task(
                            round=version * 10 + hidden + 9,
                            model=model,
                            basis_version=version,
                            classes=_CLASSES,
                            deadline=deadline,
                            hidden=hidden,
                            phase="evaluate",
                        )
                    )
                    agent.answer(
                        Model(round=version, params=model, basis_version=version, classes=_CLASSES, hidden=hidden)
                    )
        finally:
            agent.close()
    seconds = time.perf_counter() - started
    logger.info("warm-up done in %.1f s", seconds)
    return seconds


def warmup_in_subprocess(stop: threading.Event | None = None) -> float:
    """:func:`warmup` in a child ``biofed warmup`` process of this interpreter and environment
    (so the same Numba cache); return the wall seconds it took.

    When ``stop`` is set meanwhile (the agent is asked to stop), the child is terminated and
    the warm-up abandoned without an error: a cold cache's compilation can take minutes.

    Raises
    ------
    WarmupError
        The child failed; the message ends with its stderr.
    """
    started = time.perf_counter()
    with subprocess.Popen(
        [sys.executable, "-m", "biofed", "warmup"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        while True:
            try:
                _, stderr = child.communicate(timeout=_STOP_POLL_S)
                break
            except subprocess.TimeoutExpired:
                if stop is not None and stop.is_set():
                    child.terminate()
                    child.communicate()
                    logger.info("warm-up abandoned: stopping")
                    return time.perf_counter() - started
    if child.returncode != 0:
        raise WarmupError(f"biofed warmup failed (exit code {child.returncode}): {stderr.strip()[-_STDERR_TAIL:]}")
    return time.perf_counter() - started


@click.command(
    "warmup",
    epilog=examples(
        "biofed warmup",
        "biofed warmup && biofed edge --config device.toml",
    ),
)
def warmup_command() -> None:
    """Compile and cache every kernel the edge agent uses (run once after install or update)."""
    seconds = warmup()
    click.echo(f"kernels compiled and cached in {seconds:.1f} s")
