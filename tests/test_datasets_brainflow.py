"""datasets.brainflow on BrainFlow's own synthetic board (skipped where brainflow's native
libraries cannot load, e.g. aarch64: PyPI ships x86 libraries only)."""

from __future__ import annotations

import numpy as np
import pytest

from biofed.datasets import RecordingError, read_recording

try:
    from brainflow import board_shim
    from brainflow.data_filter import DataFilter
except (ImportError, OSError) as exc:  # not installed, or its x86 native libraries cannot load here
    pytest.skip(f"BrainFlow unavailable: {exc}", allow_module_level=True)

from biofed.datasets.brainflow import BrainFlowSource  # noqa: E402

SYNTHETIC = board_shim.BoardIds.SYNTHETIC_BOARD.value


@pytest.fixture(scope="module")
def session_csv(tmp_path_factory):
    """Three seconds of a live synthetic-board session, as BrainFlow writes it."""
    source = BrainFlowSource(SYNTHETIC)
    chunks = list(source.chunks(seconds=3.0))
    source.close()
    board = board_shim.BoardShim(SYNTHETIC, board_shim.BrainFlowInputParams())
    board.prepare_session()
    board.start_stream()
    import time

    time.sleep(1.5)
    board.insert_marker(7.0)
    time.sleep(0.5)
    table = board.get_board_data()
    board.stop_stream()
    board.release_session()
    path = tmp_path_factory.mktemp("bf") / "session.csv"
    DataFilter.write_file(table, str(path), "w")
    return chunks, table, path


def test_live_synthetic_board_gives_aligned_eeg_and_bio_chunks(session_csv):
    chunks, _, _ = session_csv
    eeg = np.concatenate([c.data for c in chunks if c.modality == "eeg"], axis=1)
    bio = np.concatenate([c.data for c in chunks if c.modality == "bio"], axis=1)
    assert eeg.shape == (16, 750) and bio.shape[1] == 750  # 3 s at 250 Hz, same samples
    assert [c.t0 for c in chunks if c.modality == "eeg"] == [c.t0 for c in chunks if c.modality == "bio"]
    assert np.abs(eeg).max() < 1e-2  # µV scaled to volts


def test_brainflow_csv_reads_rows_into_modalities_and_markers(session_csv):
    _, table, path = session_csv
    rec = read_recording(path, board="synthetic")
    eeg, bio = rec.signals["eeg"], rec.signals["bio"]
    assert eeg.ch_names[:3] == ("Fz", "C3", "Cz") and eeg.sfreq == 250
    np.testing.assert_allclose(eeg.data, table[1:17] * 1e-6, rtol=0, atol=5.1e-13)  # written with 6 decimals (µV)
    assert set(bio.ch_types) == {"ppg", "eda", "acc"}
    assert [a.label for a in rec.annotations] == ["marker 7"]


def test_brainflow_csv_errors_are_clear(session_csv, tmp_path):
    _, _, path = session_csv
    with pytest.raises(RecordingError, match="unknown BrainFlow board"):
        read_recording(path, board="no_such")
    with pytest.raises(RecordingError, match="columns but a"):
        read_recording(path, board="CYTON")
