"""Memory of a continuously ingesting, training edge agent over a long synthetic stream.

Run as a fresh process (``python -m biofed.benchmarks.agent_memory --hours 24``) so its RSS is the
whole agent's: interpreter, NumPy/Numba/SciPy, the kernels loaded from Numba's cache, the SQLite
store. Like :meth:`biofed.edge.agent.EdgeAgent.run`, it first warms the cache up in a child
process (:func:`biofed.edge.warmup.warmup_in_subprocess`, not part of this process's RSS).
It plays a synthetic multimodal stream (19 EEG channels at 250 Hz, a phonocardiogram at
4 kHz, ECG + PPG at 250 Hz; the class alternates every 10 minutes) as fast as the CPU allows
through the agent's live ingestion path (:class:`biofed.edge.continuous.LiveFeatures`, then
the agent's store appends), with ``store_max_rows`` small enough that eviction runs for most
of the stream. Every simulated hour the agent answers a local-DP covariance sketch (charged to
its ledger) and a training task on what is stored, and scores the newest windows with the
model. The stream is generated chunk by chunk from a small fixed pool of synthetic recordings,
as a sensor delivers it, so the input holds no memory a device would not. The coordinator's
side stays out of the process: its basis is an orthonormal projection with the running mean
and scale of the rows streamed so far, not a fit (fitting is coordinator work).

After the stream it runs :mod:`biofed.benchmarks.numba_floor` in a fresh process with the same
interpreter, environment and Numba cache: the peak of a process that only loads NumPy, Numba,
rocket-fft and one of the agent's kernels from the cache. The agent's surplus over that floor is
what the agent itself holds (its modules, its other kernels, its data).

Prints one JSON line: the peak RSS of the whole process
(:func:`biofed.peak_memory.peak_rss_mb`), the floor's peak and report, and the
surplus; the RSS by stage: after the imports, after start-up (agent, warm-up) and after the
first stored windows (the pipeline's kernels loaded); the end RSS by mapping (the LLVM library,
the heap and anonymous memory, other files); hourly samples (the RSS before the hour's tasks,
after them, and the peak so far), the growth from the first hour with the store at its cap to
the end, windows stored and evicted, and wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from biofed.benchmarks import numba_floor
from biofed.peak_memory import peak_rss_mb

_CLASSES = ("rest", "arithmetic")
_SEGMENT_S = 600.0  # the label alternates every 10 minutes
_POOL_S = 10.0
_TOP_MAPPINGS = 4


def _rss_by_mapping(process) -> dict[str, float]:
    """Resident MB per mapped file (the largest few), anonymous memory (heap, arenas, stacks)
    and the remaining files together."""
    by_path: dict[str, float] = {}
    anonymous = 0.0
    for mapping in process.memory_maps():
        mb = mapping.rss / 2**20
        if mapping.path.startswith("/"):
            name = Path(mapping.path).name
            by_path[name] = by_path.get(name, 0.0) + mb
        else:
            anonymous += mb
    top = sorted(by_path.items(), key=lambda item: -item[1])[:_TOP_MAPPINGS]
    return {
        **{name: round(mb, 1) for name, mb in top},
        "anonymous (heap, arenas, stacks)": round(anonymous, 1),
        "other files": round(sum(by_path.values()) - sum(mb for _, mb in top), 1),
    }


def _numba_floor() -> dict:
    """The report of :mod:`biofed.benchmarks.numba_floor`, run in a fresh process like this one."""
    cmd = [sys.executable, "-m", numba_floor.__name__]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the Numba floor process failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _chunks(hours: float, chunk_s: float, seed: int):
    """Chunks of ``hours`` of stream, looping over a pool of two short recordings per class."""
    from biofed.datasets import make_recording, replay

    pool = {
        label: [
            make_recording(
                label, duration_s=_POOL_S, audio_sfreq=4000.0, subject="bench", random_state=seed + 10 * i + j
            )
            for j in range(2)
        ]
        for i, label in enumerate(_CLASSES)
    }
    total = hours * 3600.0
    t = 0.0
    k = 0
    while t < total:
        label = _CLASSES[int(t // _SEGMENT_S) % 2]
        recording = pool[label][k % 2]
        for chunk in replay(recording, chunk_s=chunk_s):
            yield t + chunk.t0, chunk
        t += _POOL_S
        k += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--store-rows", type=int, default=20_000)
    parser.add_argument("--chunk", type=float, default=0.25)
    args = parser.parse_args()

    from biofed.config import DeviceConfig
    from biofed.datasets.live import BadSpans
    from biofed.edge.agent import EdgeAgent
    from biofed.edge.continuous import LiveFeatures
    from biofed.edge.pipeline import FeatureRow
    from biofed.edge.warmup import warmup_in_subprocess
    from biofed.kernels import n_params
    from biofed.model import FeatureLayout
    from biofed.protocol import Basis, Model, Task

    process = psutil.Process()
    rss_after_imports = process.memory_info().rss / 2**20
    started = time.perf_counter()
    samples = []
    with tempfile.TemporaryDirectory(prefix="biofed-bench-agent-") as tmp:
        config = DeviceConfig(
            device_id="bench", fleet="bench", store_path=Path(tmp) / "features.sqlite", store_max_rows=args.store_rows
        )
        agent = EdgeAgent(config, random_state=0)
        warmup_in_subprocess()
        rss_after_start = process.memory_info().rss / 2**20
        rss_after_first_windows = None
        features = None
        rng = np.random.default_rng(0)
        row_sum = row_sq_sum = 0.0
        n_streamed = 0
        rows: list = []
        next_hour = 3600.0
        hour = 0
        stored = 0
        trained = 0
        for t, chunk in _chunks(args.hours, args.chunk, seed=0):
            if features is None:
                from biofed.datasets import make_recording

                layout = FeatureLayout.from_recording(
                    make_recording("rest", duration_s=2.0, audio_sfreq=4000.0, random_state=0), agent.pipeline_config
                )
                agent.ingestion.bind(layout)
                features = LiveFeatures(agent.pipeline_config, layout, BadSpans())
            for row in features.feed(chunk):
                rows.append(FeatureRow(row.t, _CLASSES[int(row.t // _SEGMENT_S) % 2], row.vector))
                row_sum = row_sum + row.vector
                row_sq_sum = row_sq_sum + row.vector**2
                n_streamed += 1
            if len(rows) >= 64:
                stored += agent.ingestion.append(rows, 0.0, "bench-stream")
                rows = []
                if rss_after_first_windows is None:
                    rss_after_first_windows = process.memory_info().rss / 2**20
            if t >= next_hour:
                rss_before_tasks = process.memory_info().rss / 2**20
                hour += 1
                next_hour += 3600.0
                deadline = time.time() + 3600
                agent._on_task(
                    Task(
                        round=hour * 10,
                        model=np.empty(0),
                        basis_version=hour - 1 if hour > 1 else 0,
                        classes=_CLASSES,
                        deadline=deadline,
                        phase="covariance",
                        trust_mode="local",
                        noise_multiplier=1.0,
                    )
                )
                mean = row_sum / n_streamed
                scale = np.sqrt(np.maximum(row_sq_sum / n_streamed - mean**2, 0.0)) + 1e-6
                components = np.linalg.qr(rng.standard_normal((mean.size, 32)))[0].T
                agent._on_basis(Basis(round=hour, version=hour, components=components, mean=mean, scale=scale))
                model = np.zeros(n_params(32, 2, 0))
                out = agent._on_task(
                    Task(
                        round=hour * 10 + 1,
                        model=model,
                        basis_version=hour,
                        classes=_CLASSES,
                        deadline=deadline,
                        local_epochs=1,
                    )
                )
                trained += bool(out)
                agent._on_model(Model(round=hour, params=model, basis_version=hour, classes=_CLASSES))
                samples.append(
                    {
                        "hour": hour,
                        "rss_mb": process.memory_info().rss / 2**20,
                        "rss_before_tasks_mb": rss_before_tasks,
                        "peak_rss_mb": peak_rss_mb(),
                        "rows": agent.n_rows,
                        "wall_s": round(time.perf_counter() - started, 1),
                    }
                )
                print(json.dumps({"progress": samples[-1]}), file=sys.stderr, flush=True)
        stored += agent.ingestion.append(rows, 0.0, "bench-stream")
        n_rows = agent.n_rows
        by_mapping = _rss_by_mapping(process)
        agent.close()
    peak = peak_rss_mb()
    floor = _numba_floor()
    # flat memory: from the first hourly sample with the store at its cap (eviction running) to the last
    full = [sample for sample in samples if sample["rows"] >= args.store_rows]
    growth = full[-1]["rss_mb"] - full[0]["rss_mb"] if len(full) > 1 else float("nan")
    print(
        json.dumps(
            {
                "hours": args.hours,
                "peak_rss_mb": peak,
                "floor_peak_rss_mb": floor["peak_rss_mb"],
                "surplus_over_floor_mb": peak - floor["peak_rss_mb"],
                "floor": floor,
                "rss_after_imports_mb": rss_after_imports,
                "rss_after_start_mb": rss_after_start,
                "rss_after_first_windows_mb": rss_after_first_windows,
                "rss_by_mapping_mb": by_mapping,
                "rss_growth_at_store_cap_mb": growth,
                "samples": samples,
                "windows_stored": stored,
                "rows_in_store": n_rows,
                "store_max_rows": args.store_rows,
                "training_rounds": trained,
                "wall_s": time.perf_counter() - started,
            }
        )
    )


if __name__ == "__main__":
    main()
