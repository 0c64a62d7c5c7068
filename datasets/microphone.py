"""A microphone (or any sound-card input) as a live audio source, through sounddevice/PortAudio.

Optional extra: ``pip install "biofed[audio]"`` and the PortAudio library
(``apt install libportaudio2``). PortAudio calls :meth:`MicrophoneSource._callback` from its
own thread with each block of samples; blocks wait in a bounded queue (memory stays flat) and
:meth:`MicrophoneSource.chunks` yields them as ``audio`` :class:`~biofed.datasets.Chunk`
objects, ``t0`` = seconds of signal since the stream started. Samples lost to an input
overflow (PortAudio's flag, or a full queue when the consumer falls behind) are reported as a
:class:`~biofed.datasets.live.Gap` so windows never span them.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Iterator

import numpy as np

from biofed.datasets.live import Gap
from biofed.datasets.replay import Chunk

__all__ = ["MicrophoneSource"]

logger = logging.getLogger(__name__)


class MicrophoneSource:
    """Sound-card input as audio chunks.

    Parameters
    ----------
    device : int, str or None
        PortAudio input device (None: the default input).
    sfreq : float
        Sampling rate in Hz.
    n_channels : int
        Input channels.
    block_s : float
        Seconds per PortAudio block.
    max_queued_s : float
        Most seconds of samples waiting for the consumer; beyond it blocks are dropped (a gap).
    """

    def __init__(
        self,
        *,
        device=None,
        sfreq: float = 8000.0,
        n_channels: int = 1,
        block_s: float = 0.05,
        max_queued_s: float = 10.0,
    ) -> None:
        if not (math.isfinite(sfreq) and sfreq > 0):
            raise ValueError(f"sfreq must be finite and > 0 Hz, got {sfreq!r}.")
        if not (isinstance(n_channels, int) and n_channels >= 1):
            raise ValueError(f"n_channels must be an int >= 1, got {n_channels!r}.")
        self.device = device
        self.sfreq = float(sfreq)
        self.n_channels = n_channels
        self.blocksize = max(1, int(round(block_s * sfreq)))
        self.source = f"microphone:{device if device is not None else 'default'}"
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(max_queued_s / block_s)))
        self._stream = None
        self.overflows = 0

    def channels(self) -> dict:
        names = ("MIC",) if self.n_channels == 1 else tuple(f"MIC{i + 1}" for i in range(self.n_channels))
        return {"audio": (self.sfreq, names, ("audio",) * self.n_channels)}

    def _callback(self, indata, frames, time_info, status) -> None:
        lost = bool(status and status.input_overflow)
        try:
            self._queue.put_nowait((np.array(indata, dtype=np.float64).T, lost))
        except queue.Full:  # the consumer fell behind: the block is lost, the next one says so
            self.overflows += 1
            self._dropped = True

    def open(self) -> None:
        try:
            import sounddevice as sd
        except (ImportError, OSError) as exc:
            raise ImportError(
                f'a microphone needs sounddevice and PortAudio: pip install "biofed[audio]" and '
                f"apt install libportaudio2 ({exc})"
            ) from None
        self._dropped = False
        self._stream = sd.InputStream(
            samplerate=self.sfreq,
            channels=self.n_channels,
            dtype="float32",
            blocksize=self.blocksize,
            device=self.device,
            callback=self._callback,
        )
        self._stream.start()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
            self._stream = None

    def chunks(self, stop: threading.Event | None = None, *, seconds: float | None = None) -> Iterator[Chunk | Gap]:
        if self._stream is None:
            self.open()
        n = 0
        limit = math.inf if seconds is None else round(seconds * self.sfreq)
        while (stop is None or not stop.is_set()) and n < limit:
            try:
                block, lost = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if lost or self._dropped:
                self._dropped = False
                self.overflows += lost
                logger.warning("%s: input overflow, samples lost at t=%.2f s", self.source, n / self.sfreq)
                yield Gap(self.source, n / self.sfreq, 0.0)
            block = block[:, : int(min(block.shape[1], limit - n))]
            yield Chunk(self.source, "audio", n / self.sfreq, block, None)
            n += block.shape[1]
