"""What a working edge agent leaves unimported: an ingesting, training, local-DP agent that
scores windows with a model without ONNX bytes needs no onnxruntime, no dp_accounting (nor
the SciPy modules it loads), no MNE, no matplotlib. Its releases are still charged to its
durable ledger first; an epsilon, when asked for, imports dp_accounting then."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

# Modules that cost the agent memory and that none of the work below needs.
NOT_IMPORTED = (
    "onnx",
    "onnxruntime",
    "dp_accounting",
    "scipy.signal",
    "scipy.stats",
    "mpmath",
    "mne",
    "mne_lsl",
    "matplotlib",
    "amqtt",
)

_AGENT_WORK = """
import json, sys, tempfile, time
from pathlib import Path

import numpy as np

from biofed.config import DeviceConfig
from biofed.datasets import make_recording, replay
from biofed.datasets.live import BadSpans
from biofed.edge.agent import EdgeAgent
from biofed.edge.continuous import LiveFeatures
from biofed.edge.pipeline import FeatureRow
from biofed.kernels import n_params
from biofed.model import FeatureLayout
from biofed.privacy_ledger import PrivacyLedger
from biofed.protocol import Basis, Model, Task

classes = ("rest", "arithmetic")
with tempfile.TemporaryDirectory() as tmp:
    config = DeviceConfig(
        device_id="d", fleet="f", store_path=Path(tmp) / "s.db", predict=True, warmup=False
    )
    agent = EdgeAgent(config, random_state=0)
    for i, label in enumerate(classes):  # the live ingestion path: windows as a sensor delivers them
        recording = make_recording(label, duration_s=12.0, eeg_channels=4, audio_sfreq=2000.0, random_state=i)
        layout = FeatureLayout.from_recording(recording, agent.pipeline_config)
        agent.ingestion.bind(layout)
        live = LiveFeatures(agent.pipeline_config, layout, BadSpans())
        rows = [FeatureRow(row.t, label, row.vector) for chunk in replay(recording) for row in live.feed(chunk)]
        agent.ingestion.append(rows, 0.0, f"live-{label}")
    deadline = time.time() + 3600
    sketch = agent.answer(Task(
        round=1, model=np.empty(0), basis_version=0, classes=classes, deadline=deadline,
        phase="covariance", noise_multiplier=1.0, trust_mode="local",
    ))
    X, _, _ = agent.store.read()
    components = np.linalg.qr(np.random.default_rng(0).standard_normal((X.shape[1], 8)))[0].T
    agent.answer(Basis(round=1, version=1, components=components, mean=X.mean(0), scale=X.std(0) + 1e-6))
    model = np.zeros(n_params(8, 2, 0))
    update = agent.answer(Task(
        round=2, model=model, basis_version=1, classes=classes, deadline=deadline,
        noise_multiplier=1.0, trust_mode="local",
    ))
    agent.answer(Model(round=2, params=model, basis_version=1, classes=classes))
    loaded = sorted(m for m in NOT_IMPORTED if m in sys.modules)
    stored = PrivacyLedger.from_json(agent.store.privacy_ledger_json("client"))
    charged = [len(agent.mechanism.ledger), len(stored)]
    epsilon = agent.privacy_report()["client_epsilon"]
    agent.close()
print(json.dumps({
    "published": [len(sketch or []), len(update or [])],
    "loaded": loaded,
    "charged": charged,
    "epsilon": epsilon,
    "dp_accounting_after_epsilon": "dp_accounting" in sys.modules,
}))
"""


def test_an_ingesting_training_agent_imports_nothing_it_does_not_use():
    code = f"NOT_IMPORTED = {NOT_IMPORTED!r}\n" + textwrap.dedent(_AGENT_WORK)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["published"] == [1, 1], "the agent answered the sketch and the training task"
    assert result["loaded"] == [], f"the agent imported {result['loaded']}"
    # both local-mode releases charged, durably, before they were published
    assert result["charged"] == [2, 2]
    assert 0 < result["epsilon"] < float("inf") and result["dp_accounting_after_epsilon"]


def test_agent_memory_benchmark_reports_the_whole_process_rss_by_stage():
    """The benchmark's figures (not judged here: targets live in the suite) are consistent:
    the peak covers start-up and the first windows, the store sits at its cap, one training
    round ran, the end RSS is split by mapping, and the floor process loaded the agent's
    kernel from the cache with nothing of biofed but the kernels."""
    cmd = [sys.executable, "-m", "biofed.benchmarks.agent_memory", "--hours", "1.05", "--store-rows", "500"]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    assert 0 < out["rss_after_imports_mb"] <= out["rss_after_start_mb"] <= out["rss_after_first_windows_mb"]
    assert out["rss_after_first_windows_mb"] <= out["peak_rss_mb"]
    (hour,) = out["samples"]
    assert hour["rss_before_tasks_mb"] <= hour["peak_rss_mb"] and hour["rss_mb"] <= hour["peak_rss_mb"]
    assert hour["peak_rss_mb"] <= out["peak_rss_mb"]
    assert out["rows_in_store"] == 500 < out["windows_stored"]
    assert out["training_rounds"] == 1 and [s["hour"] for s in out["samples"]] == [1]
    by_mapping = out["rss_by_mapping_mb"]
    assert by_mapping["anonymous (heap, arenas, stacks)"] > 0
    assert 0.5 * out["samples"][0]["rss_mb"] < sum(by_mapping.values()) <= out["peak_rss_mb"] + 1
    floor = out["floor"]
    assert floor["cache_hits"] == 1 and floor["cache_misses"] == 0 and floor["finite"]
    assert 0 < floor["rss_after_imports_mb"] < floor["peak_rss_mb"] == out["floor_peak_rss_mb"]
    assert out["surplus_over_floor_mb"] == out["peak_rss_mb"] - out["floor_peak_rss_mb"]
    assert [m for m in floor["biofed_modules"] if not m.startswith("biofed.kernels")] == [
        "biofed",
        "biofed.benchmarks",
        "biofed.peak_memory",
    ]


def test_the_floor_refuses_to_measure_a_kernel_it_had_to_compile(tmp_path):
    """With an empty Numba cache the floor process would measure the compiler, not a cached
    load: it says so and how to fill the cache, and fails."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "biofed.benchmarks.numba_floor"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 1
    assert "compiled, not loaded from Numba's cache" in proc.stderr and "biofed warmup" in proc.stderr
    report = json.loads(proc.stdout)
    assert report["cache_misses"] == 1 and report["cache_hits"] == 0


def test_a_failing_warm_up_child_is_a_clear_error(monkeypatch):
    from biofed.edge.warmup import WarmupError, warmup_in_subprocess

    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(WarmupError, match=r"biofed warmup failed \(exit code 1\)"):
        warmup_in_subprocess()


def test_a_stop_during_the_warm_up_terminates_the_child(monkeypatch, tmp_path):
    """An agent asked to stop while a (cold, minutes-long) warm-up runs does not wait for it."""
    import threading

    from biofed.edge.warmup import warmup_in_subprocess

    pid_file = tmp_path / "child.pid"
    endless = tmp_path / "endless-warmup"
    endless.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 600\n")
    endless.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(endless))
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    assert warmup_in_subprocess(stop) < 600
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # terminated and reaped
        os.kill(pid, 0)
