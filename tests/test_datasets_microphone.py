"""datasets.microphone: a real PortAudio input where the machine has one; otherwise (CI,
containers) sounddevice's InputStream is replaced by a stand-in that calls the callback from
its own thread exactly as PortAudio does."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from biofed.datasets.live import Gap
from biofed.datasets.microphone import MicrophoneSource

try:
    import sounddevice as sd
except (ImportError, OSError):  # no sounddevice or no PortAudio library
    sd = None

HAS_INPUT = sd is not None and any(d["max_input_channels"] > 0 for d in sd.query_devices())
TONE = np.sin(2 * np.pi * 440.0 * np.arange(8000) / 8000.0).astype(np.float32)


class FakeInputStream:
    """PortAudio's contract: callback(indata (frames, channels) float32, frames, time, status)."""

    def __init__(self, *, samplerate, channels, dtype, blocksize, device, callback, overflow_at=None):
        self.blocksize, self.callback, self.overflow_at = blocksize, callback, overflow_at
        self.stop_event = threading.Event()

    def start(self):
        def run():
            for k, start in enumerate(range(0, len(TONE), self.blocksize)):
                if self.stop_event.is_set():
                    return
                block = TONE[start : start + self.blocksize, None]
                status = SimpleNamespace(input_overflow=(k == self.overflow_at))
                self.callback(block, len(block), None, status)

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def stop(self):
        self.stop_event.set()
        self.thread.join()

    def close(self):
        pass


@pytest.fixture
def fake_portaudio(monkeypatch):
    if HAS_INPUT:
        pytest.skip("a real input device exists: tested by test_real_input_device")
    fake = SimpleNamespace(InputStream=FakeInputStream)
    monkeypatch.setitem(__import__("sys").modules, "sounddevice", fake)
    return fake


def test_blocks_become_contiguous_audio_chunks(fake_portaudio):
    source = MicrophoneSource(sfreq=8000.0, block_s=0.05)
    chunks = list(source.chunks(seconds=0.5))
    source.close()
    data = np.concatenate([c.data for c in chunks], axis=1)
    assert data.shape == (1, 4000)
    np.testing.assert_array_equal(data[0], TONE[:4000].astype(np.float64))
    assert [c.t0 for c in chunks] == pytest.approx([0.05 * i for i in range(10)])
    assert source.channels() == {"audio": (8000.0, ("MIC",), ("audio",))}


def test_an_input_overflow_is_a_gap(fake_portaudio, monkeypatch):
    monkeypatch.setattr(fake_portaudio, "InputStream", lambda **kw: FakeInputStream(**kw, overflow_at=3))
    source = MicrophoneSource(sfreq=8000.0, block_s=0.05)
    events = list(source.chunks(seconds=0.5))
    source.close()
    gaps = [i for i, e in enumerate(events) if isinstance(e, Gap)]
    assert gaps == [3] and events[3].t == pytest.approx(0.15) and source.overflows == 1


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="sfreq"):
        MicrophoneSource(sfreq=0)
    with pytest.raises(ValueError, match="n_channels"):
        MicrophoneSource(n_channels=0)


@pytest.mark.skipif(not HAS_INPUT, reason="no audio input device on this machine")
def test_real_input_device():
    source = MicrophoneSource(sfreq=8000.0)
    data = np.concatenate([c.data for c in source.chunks(seconds=0.5) if not isinstance(c, Gap)], axis=1)
    source.close()
    assert data.shape == (1, 4000) and np.isfinite(data).all()
