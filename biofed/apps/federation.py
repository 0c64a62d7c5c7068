"""A whole federation on one machine: the pieces ``biofed demo`` runs and the federation tests share.

- :func:`write_synthetic_devices`: a synthetic fleet written as the FIF + WAV files devices replay.
- :func:`start_broker`: the broker of a local federation (embedded amqtt, Mosquitto, or a
  provisioned Mosquitto with TLS and per-identity credentials).
- :func:`broker_settings`: the ``[broker]`` settings of a config that connects to such a broker.
- :func:`spawn`, :class:`Child`, :func:`terminate`, :func:`tails`: ``biofed`` commands (a device is
  ``biofed edge --config device.toml``, the coordinator ``biofed coordinator --config ...``) as
  child processes in their own sessions, each with its log file.
- :class:`AgentThreads`: real :class:`~biofed.edge.agent.EdgeAgent` objects, each running its
  loop in a thread of this process (a federation a test can inspect and fault from inside).
- :class:`Listener`: a subscribed client whose messages a thread hands to a callback (the
  demo's accuracy observer, the audit's tap, the tests' task watchers).
- :func:`received`: every message a subscribed client has been sent, decoded.

Every server listens on loopback only.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "AgentThreads",
    "Child",
    "Listener",
    "broker_settings",
    "received",
    "spawn",
    "start_broker",
    "tails",
    "terminate",
    "write_synthetic_devices",
]

TAIL_LINES = 30
"""Log lines of a child shown when it fails."""


def write_synthetic_devices(
    folder: Path, n_devices: int, *, duration_s: float = 60.0, random_state=None
) -> dict[str, list[Path]]:
    """Write a synthetic federation (:func:`biofed.datasets.make_federation`) as files a device replays.

    Each recording becomes ``<device>_<k>_<label>_raw.fif`` (EEG + ECG + PPG, the label as an
    annotation over the whole recording, the subject as ``his_id``) and
    ``<device>_<k>_<label>.wav`` (the phonocardiogram, float32). Returns the files per device
    in replay order (each FIF followed by its WAV: they form one multimodal stream).
    """
    import mne
    from scipy.io import wavfile

    from biofed.datasets import make_federation

    folder.mkdir(parents=True, exist_ok=True)
    federation = make_federation(n_devices, duration_s=duration_s, random_state=random_state)
    files: dict[str, list[Path]] = {}
    for device, recordings in federation.items():
        paths = []
        for k, rec in enumerate(recordings):
            eeg, bio, audio = rec.signals["eeg"], rec.signals["bio"], rec.signals["audio"]
            if bio.sfreq != eeg.sfreq:
                raise ValueError(
                    f"synthetic EEG ({eeg.sfreq} Hz) and bio ({bio.sfreq} Hz) rates differ; one FIF needs one rate"
                )
            mne_types = ["eeg"] * len(eeg.ch_names) + ["ecg" if t == "ecg" else "misc" for t in bio.ch_types]
            info = mne.create_info(list(eeg.ch_names) + list(bio.ch_names), eeg.sfreq, mne_types)
            info["subject_info"] = {"his_id": rec.subject}
            raw = mne.io.RawArray(np.vstack([eeg.data, bio.data]), info, verbose="error")
            raw.set_annotations(mne.Annotations([0.0], [rec.duration], [rec.label]))
            stem = f"{device}_{k}_{rec.label}"
            fif = folder / f"{stem}_raw.fif"
            raw.save(fif, overwrite=True, verbose="error")
            wav = folder / f"{stem}.wav"
            wavfile.write(wav, int(audio.sfreq), audio.data[0].astype(np.float32))
            paths += [fif.resolve(), wav.resolve()]
        files[device] = paths
    return files


# ----------------------------------------------------------------------------- broker
def start_broker(out: Path, fleet_name: str, devices: Iterable[str], *, secure: bool = False, mosquitto: bool = False):
    """Start the broker of a local federation; returns ``(broker, protocol, fleet)``.

    ``secure``: provision ``fleet_name`` for ``devices`` (and a read-only observer) under
    ``out/fleet`` (:func:`biofed.apps.provision.provision_fleet`) and start its TLS Mosquitto;
    ``fleet`` is then the :class:`~biofed.apps.provision.ProvisionedFleet`. ``mosquitto``: a plain
    Mosquitto (MQTT 5) with its files in ``out/mosquitto``. Otherwise the embedded amqtt broker
    (MQTT 3.1.1). ``fleet`` is None unless ``secure``.

    Raises
    ------
    biofed.apps.broker.BrokerError, biofed.apps.provision.ProvisionError
        The broker could not be provisioned or started.
    """
    from biofed.apps.broker import free_port, start_embedded_broker, start_mosquitto

    if secure:
        from biofed.apps.provision import provision_fleet

        shutil.rmtree(out / "fleet", ignore_errors=True)
        fleet = provision_fleet(out / "fleet", fleet_name, sorted(devices), port=free_port(), observer=True)
        return fleet.start_broker(), "5", fleet
    if mosquitto:
        return start_mosquitto(out / "mosquitto"), "5", None
    return start_embedded_broker(), "3.1.1", None


def broker_settings(broker, protocol: str, **extra) -> dict:
    """``[broker]`` settings (host, port, protocol and ``extra``) of a config connecting to ``broker``."""
    return {"host": broker.host, "port": broker.port, "protocol": protocol, **extra}


# ----------------------------------------------------------------------------- processes
@dataclass
class Child:
    """A ``biofed`` command running as a child process, its output in ``log``."""

    name: str
    process: subprocess.Popen
    log: Path

    def tail(self, n: int = TAIL_LINES) -> str:
        """The last ``n`` lines of its log."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])


def spawn(name: str, args: list[str], log: Path, *, stdout=None) -> Child:
    """Run ``python -m biofed -v ARGS`` in a new session with stderr (and stdout, unless given) in ``log``.

    The child's configs decide: no ``BIOFED_*`` variable of the caller's environment reaches it.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = log.open("w")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIOFED_")}
    env["PYTHONUNBUFFERED"] = "1"
    process = subprocess.Popen(
        [sys.executable, "-m", "biofed", "-v", *args],
        stdout=stdout if stdout is not None else handle,
        stderr=handle,
        env=env,
        start_new_session=True,
        text=True,
    )
    handle.close()  # the child holds its own descriptor
    return Child(name, process, log)


def terminate(children: Sequence[Child], timeout_s: float = 10.0) -> None:
    """SIGTERM every running child, then SIGKILL those still running after ``timeout_s``."""
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in children:
        try:
            child.process.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()


def tails(children: Sequence[Child]) -> str:
    """Each child's exit code and the tail of its log, for an error message."""
    parts = []
    for child in children:
        code = child.process.poll()
        parts.append(
            f"--- {child.name} (exit code {code if code is not None else 'running'}), {child.log}:\n{child.tail()}"
        )
    return "\n".join(parts)


# ----------------------------------------------------------------------------- in-process agents
class AgentThreads:
    """Real agents, each running :meth:`~biofed.edge.agent.EdgeAgent.run` in a thread of this process.

    Use it as a context manager around the coordinator's run: leaving the block stops every
    agent loop, waits for the threads and closes the agents (their stores and connections)::

        with AgentThreads(agents):
            state = coordinator.run()

    Parameters
    ----------
    agents : iterable of EdgeAgent
        Configured agents (their own broker settings, stores and keys).
    join_timeout_s : float
        How long :meth:`close` waits for each agent's loop to end.
    """

    def __init__(self, agents: Iterable, *, join_timeout_s: float = 30.0) -> None:
        self.agents = list(agents)
        self.join_timeout_s = join_timeout_s
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=agent.run, args=(self._stop,), name=f"agent-{agent.device_id}", daemon=True)
            for agent in self.agents
        ]

    def start(self) -> AgentThreads:
        """Start every agent's loop."""
        for thread in self._threads:
            thread.start()
        return self

    def close(self) -> None:
        """Stop every loop, wait for it, and close every agent."""
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=self.join_timeout_s)
        for agent in self.agents:
            agent.close()

    def __enter__(self) -> AgentThreads:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()


class Listener:
    """A subscribed MQTT client whose inbound messages a thread hands to ``handle``, in order.

    Parameters
    ----------
    client : biofed.mqtt.MqttClient
        Not connected yet: :meth:`start` connects it; :meth:`stop` closes it.
    subscriptions : iterable of str
        Topic filters, subscribed at QoS 1.
    handle : callable
        Called with each :class:`biofed.mqtt.InboundMessage` on the listener's thread.
    name : str
        The thread's name.
    """

    def __init__(self, client, subscriptions: Iterable[str], handle, *, name: str = "listener") -> None:
        self.client = client
        self.subscriptions = tuple(subscriptions)
        self._handle = handle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> Listener:
        """Connect, subscribe and start handing messages over."""
        self.client.connect()
        for topic in self.subscriptions:
            self.client.subscribe(topic, qos=1)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            inbound = self.client.receive(timeout_s=0.2)
            if inbound is not None:
                self._handle(inbound)

    def stop(self) -> None:
        """Stop the thread and close the client."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        self.client.close()


def received(client, topics, *, timeout_s: float = 0.5, verifier=None) -> list:
    """Every message ``client`` receives until none arrives for ``timeout_s``, decoded.

    Parameters
    ----------
    client : biofed.mqtt.MqttClient
        A connected client, subscribed to what is wanted.
    topics : biofed.protocol.Topics
        The fleet's topics.
    verifier : optional
        Signature verifier (e.g. a :class:`biofed.signing.KeyRing`) passed to the decoder.

    Returns
    -------
    list of biofed.protocol.Message
    """
    from biofed.protocol import decode_topic_message

    messages = []
    while (inbound := client.receive(timeout_s=timeout_s)) is not None:
        messages.append(decode_topic_message(topics, inbound.topic, inbound.payload, verifier=verifier))
    return messages
