"""Continuous operation and the lean start: BAD windows, [[sources]] config, CLI imports, warm-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from biofed.config import ConfigError, DeviceConfig, load_config
from biofed.datasets import Annotation, Recording, make_recording
from biofed.datasets.live import BadSpans
from biofed.datasets.replay import bad_spans, replay
from biofed.edge.agent import EdgeAgent
from biofed.edge.continuous import LiveFeatures
from biofed.edge.pipeline import PipelineConfig
from biofed.model import FeatureLayout

HEAVY = ("numba", "scipy", "onnx", "onnxruntime", "mne", "mne_lsl", "dp_accounting", "matplotlib", "amqtt")


@pytest.mark.parametrize("args", [["--help"], ["--version"]])
def test_cli_help_and_version_import_nothing_heavy(args):
    code = textwrap.dedent(f"""
        import json, sys
        from biofed.apps.cli import cli
        try:
            cli.main({args!r}, standalone_mode=False)
        except SystemExit:
            pass
        print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    assert loaded == [], f"biofed {' '.join(args)} imported {loaded}"


def test_help_lists_every_command_with_its_summary():
    out = subprocess.run([sys.executable, "-m", "biofed", "--help"], capture_output=True, text=True, check=True).stdout
    assert "play         Serve recording FILEs as live LSL streams" in out
    assert "warmup       Compile and cache every kernel" in out


def test_windows_overlapping_bad_annotations_are_not_stored(tmp_path):
    import mne

    from biofed.apps.federation import write_synthetic_devices

    fif = next(
        f
        for f in write_synthetic_devices(tmp_path, 1, duration_s=12.0, random_state=4)["device00"]
        if f.suffix == ".fif"
    )
    raw = mne.io.read_raw_fif(fif, preload=True, verbose="error")
    raw.set_annotations(raw.annotations + mne.Annotations([5.0], [1.0], ["BAD_motion"]))
    bad_fif = tmp_path / "with_bad_raw.fif"
    raw.save(bad_fif, verbose="error")
    stores = {}
    for name, path in (("clean", fif), ("bad", bad_fif)):
        agent = EdgeAgent(
            DeviceConfig(device_id="d", fleet="f", recordings=[path], store_path=tmp_path / f"{name}.db", warmup=False)
        )
        agent.ingest()
        stores[name] = agent.store.read()
        agent.close()
    t_clean, t_bad = stores["clean"][2], stores["bad"][2]
    # windows of 2 s every 1 s: those starting at 4 and 5 s (and 3 s: [3, 5) touches 5.0? no) overlap [5, 6)
    assert set(t_clean) - set(t_bad) == {4.0, 5.0}
    kept = np.isin(t_clean, t_bad)
    np.testing.assert_array_equal(stores["clean"][0][kept], stores["bad"][0])


def test_live_features_drop_bad_windows_and_restart_after_a_gap():
    from biofed.datasets.live import Gap

    rec = make_recording("rest", duration_s=10.0, eeg_channels=2, audio_sfreq=1000.0, random_state=0)
    config = PipelineConfig()
    spans = BadSpans()
    spans.add(*bad_spans(Recording(source="x", signals=rec.signals, annotations=(Annotation(2.5, 0.5, "BAD_x"),)))[0])
    features = LiveFeatures(config, FeatureLayout.from_recording(rec, config), spans)
    rows = []
    for chunk in replay(rec):
        rows += features.feed(chunk)
    assert [r.t for r in rows] == [0.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]  # 1 and 2 touch [2.5, 3)
    assert features.rejected_bad == 2
    features.feed(Gap("eeg", 100.0, 80.0))
    after = []
    for chunk in replay(rec):
        after += features.feed(chunk)
    assert after[0].t == 100.0 and len(after) == 9


def test_sources_config_accepts_file_folder_and_lsl(tmp_path):
    (tmp_path / "incoming").mkdir()
    path = tmp_path / "device.toml"
    path.write_text(
        textwrap.dedent("""
        device_id = "pi-01"
        fleet = "ward7"
        store_path = "features.sqlite"
        [[sources]]
        kind = "lsl"
        name = "pi-01"
        [[sources]]
        kind = "file"
        path = "incoming"
        watch = true
    """)
    )
    config = load_config(path, DeviceConfig)
    assert [s.kind for s in config.sources] == ["lsl", "file"]
    assert config.sources[1].path == tmp_path / "incoming"


@pytest.mark.parametrize(
    "source, message",
    [
        ('kind = "lsl"', "needs name"),
        ('kind = "file"', "needs path"),
        ('kind = "lsl"\nname = "x"\nwatch = true', "belong to kind"),
        ('kind = "file"\npath = "device.toml"\nwatch = true', "needs a folder"),
        ('kind = "serial"\npath = "x"', "sources.0.kind"),
    ],
)
def test_bad_sources_are_clear_config_errors(tmp_path, source, message):
    path = tmp_path / "device.toml"
    path.write_text(f'device_id = "d"\nfleet = "f"\nstore_path = "s.db"\n[[sources]]\n{source}\n')
    with pytest.raises(ConfigError, match=message):
        load_config(path, DeviceConfig)


@pytest.mark.slow
def test_warmup_compiles_every_kernel_the_agent_uses(tmp_path):
    """A cold cache: ``biofed warmup`` compiles; afterwards the agent's whole work (ingest,
    sketches, training, evaluation, scoring) loads every kernel from the cache, compiling none."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    subprocess.run([sys.executable, "-m", "biofed", "warmup"], env=env, check=True, capture_output=True)
    code = textwrap.dedent("""
        import gc, json
        from numba.core.registry import CPUDispatcher
        from biofed.edge.warmup import warmup
        warmup()
        misses = {d.__qualname__: len(d.stats.cache_misses) for d in gc.get_objects()
                  if isinstance(d, CPUDispatcher) and d.__module__.startswith("biofed") and d.stats.cache_misses}
        hits = sum(len(d.stats.cache_hits) for d in gc.get_objects() if isinstance(d, CPUDispatcher))
        print(json.dumps([misses, hits]))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
    misses, hits = json.loads(out.strip().splitlines()[-1])
    assert misses == {} and hits > 0
