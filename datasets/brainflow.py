"""BrainFlow boards: their CSV recordings and live sessions (optional extra ``biofed[brainflow]``).

BrainFlow (``pip install "biofed[brainflow]"``) describes every board by a table of rows:
EEG rows with electrode names, PPG, EDA, accelerometer, a package counter, a timestamp and a
marker row. ``DataFilter.write_file`` saves a session as tab-separated text, one line per
sample and one column per row, without a header, so reading it needs the board's id.

Rows become modalities as in every biofed reader: EEG rows (µV) -> ``eeg`` in volts; PPG, EDA,
accelerometer rows -> ``bio``; ECG rows -> ``bio`` only when they are not the EEG electrodes
(generic ExG boards list one electrode set as EEG, ECG, EMG and EOG). Non-zero marker values
become zero-duration annotations ``"marker <value>"``.

PyPI's ``brainflow`` wheels ship x86/x86_64 native libraries only: on an aarch64 Raspberry Pi
build BrainFlow from source or stream the board to the Pi through LSL.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from biofed.datasets.recording import Annotation, Recording, RecordingError, Signal
from biofed.datasets.replay import Chunk

__all__ = ["BrainFlowSource", "board_rows", "read_brainflow_csv"]

logger = logging.getLogger(__name__)


def _board_shim():
    try:
        from brainflow.board_shim import BoardShim
    except ImportError:
        raise ImportError('BrainFlow is not installed: pip install "biofed[brainflow]" (x86 only on PyPI)') from None
    return BoardShim


def _board_id(board) -> int:
    if isinstance(board, int) and not isinstance(board, bool):
        return board
    if isinstance(board, str):
        from brainflow.board_shim import BoardIds

        key = board.strip().upper()
        key = key if key.endswith("_BOARD") else f"{key}_BOARD"
        try:
            return BoardIds[key].value
        except KeyError:
            raise ValueError(
                f"unknown BrainFlow board {board!r}; use a BoardIds name such as 'SYNTHETIC' or "
                "'CYTON', or its integer id."
            ) from None
    raise ValueError(f"board must be a BrainFlow board id (int) or name (str), got {board!r}.")


def board_rows(board) -> dict:
    """``{modality: (rows, ch_names, ch_types, scale)}`` and the board's rate, marker and counter rows."""
    shim = _board_shim()
    board_id = _board_id(board)
    descr = shim.get_board_descr(board_id)
    eeg = list(descr.get("eeg_channels", []))
    names = descr.get("eeg_names", "")
    eeg_names = names.split(",") if names else [f"EEG{i + 1}" for i in range(len(eeg))]
    bio_rows, bio_names, bio_types = [], [], []
    ecg = [r for r in descr.get("ecg_channels", []) if r not in eeg]
    for kind, rows in (
        ("ecg", ecg),
        ("ppg", descr.get("ppg_channels", [])),
        ("eda", descr.get("eda_channels", [])),
        ("acc", descr.get("accel_channels", [])),
    ):
        for i, row in enumerate(rows):
            bio_rows.append(row)
            bio_names.append(f"{kind.upper()}{i + 1}")
            bio_types.append(kind)
    modalities = {}
    if eeg:
        modalities["eeg"] = (eeg, tuple(eeg_names), ("eeg",) * len(eeg), 1e-6)
    if bio_rows:
        modalities["bio"] = (bio_rows, tuple(bio_names), tuple(bio_types), 1.0)
    return {
        "modalities": modalities,
        "sfreq": float(descr["sampling_rate"]),
        "num_rows": int(descr["num_rows"]),
        "marker": descr.get("marker_channel"),
        "package": descr.get("package_num_channel"),
        "name": descr.get("name", str(board_id)),
    }


def _signals(table: np.ndarray, rows: dict) -> dict[str, Signal]:
    signals = {}
    for modality, (index, names, types, scale) in rows["modalities"].items():
        units = ("V",) * len(index) if modality == "eeg" else tuple("NU" for _ in index)
        signals[modality] = Signal(table[index] * scale, rows["sfreq"], names, types, units)
    return signals


def read_brainflow_csv(path, board) -> Recording:
    """Read a file written by BrainFlow's ``DataFilter.write_file`` for ``board`` (id or name)."""
    path = Path(path)
    try:
        rows = board_rows(board)
    except ValueError as exc:
        raise RecordingError(path, str(exc)) from None
    try:
        table = np.loadtxt(path, delimiter="\t", dtype=np.float64, ndmin=2).T
    except ValueError as exc:
        raise RecordingError(path, f"not a BrainFlow CSV (tab-separated numbers): {exc}") from None
    if table.shape[0] != rows["num_rows"]:
        raise RecordingError(
            path,
            f"has {table.shape[0]} columns but a {rows['name']} board writes "
            f"{rows['num_rows']}; is it a file of another board?",
        )
    if table.shape[1] == 0:
        raise RecordingError(path, "holds no samples.")
    try:
        signals = _signals(table, rows)
    except ValueError as exc:
        raise RecordingError(path, str(exc)) from None
    annotations = ()
    if rows["marker"] is not None:
        hits = np.flatnonzero(table[rows["marker"]])
        annotations = tuple(Annotation(i / rows["sfreq"], 0.0, f"marker {table[rows['marker'], i]:g}") for i in hits)
    return Recording(source=str(path), signals=signals, annotations=annotations)


class BrainFlowSource:
    """A live BrainFlow board session as chunks (one board = one clock: its modalities share samples).

    ``chunks`` yields :class:`~biofed.datasets.Chunk` objects like
    :class:`biofed.datasets.live.LslSource` (``t0`` = seconds since the session started).
    Lost packets show as a jump of the board's package counter and are logged.
    """

    def __init__(self, board, *, params=None, poll_s: float = 0.02) -> None:
        self.rows = board_rows(board)
        self.board_id = _board_id(board)
        self.params = params
        self.poll_s = poll_s
        self.source = f"brainflow:{self.rows['name']}"
        self._board = None
        self._n = 0
        self.lost_packets = 0
        self._last_package = None

    def channels(self) -> dict:
        return {m: (self.rows["sfreq"], names, types) for m, (_, names, types, _) in self.rows["modalities"].items()}

    def open(self) -> None:
        from brainflow.board_shim import BrainFlowInputParams

        shim = _board_shim()
        self._board = shim(self.board_id, self.params or BrainFlowInputParams())
        self._board.prepare_session()
        self._board.start_stream()

    def close(self) -> None:
        if self._board is not None:
            try:
                self._board.stop_stream()
            finally:
                self._board.release_session()
                self._board = None

    def _count_lost(self, packages: np.ndarray) -> None:
        values = packages.astype(np.int64)
        if self._last_package is not None:
            values = np.concatenate([[self._last_package], values])
        steps = np.diff(values) % 256  # the counter wraps at 256
        lost = int(np.sum(steps[steps > 1] - 1))
        if lost:
            self.lost_packets += lost
            logger.warning("%s: %d packet(s) lost", self.source, lost)
        self._last_package = int(values[-1])

    def chunks(self, stop: threading.Event | None = None, *, seconds: float | None = None) -> Iterator[Chunk]:
        if self._board is None:
            self.open()
        fs = self.rows["sfreq"]
        limit = math.inf if seconds is None else round(seconds * fs)
        while (stop is None or not stop.is_set()) and self._n < limit:
            table = self._board.get_board_data()
            if table.shape[1] == 0:
                time.sleep(self.poll_s)
                continue
            table = table[:, : int(min(table.shape[1], limit - self._n))]
            if self.rows["package"] is not None:
                self._count_lost(table[self.rows["package"]])
            t0 = self._n / fs
            for modality, signal in _signals(table, self.rows).items():
                yield Chunk(self.source, modality, t0, signal.data, None)
            self._n += table.shape[1]
