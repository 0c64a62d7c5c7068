"""Durable coordinator state in SQLite (``state_dir/coordinator.sqlite``).

A restarted coordinator resumes from the last committed round: the next round number,
the phase, the model, the basis, the strategy's optimizer state, the clip norm, the
privacy ledger and the message ids of every accepted update are written together, in one
transaction per closed round (:meth:`CoordinatorState.commit_round`), so an update is
either fully counted (aggregated, accounted, its id remembered) or not at all.

Schema (``SCHEMA_VERSION`` 1)
-----------------------------
``meta(key TEXT PRIMARY KEY, value TEXT)``
    ``schema_version``, ``fleet`` (a state directory serves one fleet).
``scalars(key TEXT PRIMARY KEY, value TEXT)``
    JSON values of :class:`Snapshot`'s scalar fields (``next_round``, ``phase``,
    ``train_rounds_done``, ``basis_version``, ``n_features``, ``clip_norm``,
    ``stop_reason``) and ``ledger`` (the :class:`~biofed.privacy_ledger.PrivacyLedger`
    JSON).
``arrays(name TEXT PRIMARY KEY, data BLOB)``
    ``.npy`` bytes (``allow_pickle=False``): ``params``, ``stats_mean``, ``stats_scale``,
    ``basis_components``, ``basis_mean``, ``basis_scale`` and ``strategy.<key>`` for each
    entry of the strategy's ``state_dict()``.
``accepted(message_id TEXT PRIMARY KEY, round INTEGER, device_id TEXT, kind TEXT)``
    Every update/sketch that went into a committed aggregate.
``rounds(round INTEGER PRIMARY KEY, ...)``
    One row per closed round (:data:`ROUND_COLUMNS`): phase, training round index,
    devices selected and reporting, mean loss, mean eval balanced accuracy, eval windows,
    epsilon (RDP and PLD; NULL when not computed, ``inf`` is stored as SQLite's infinity),
    the DP parameters used (sampling rate, noise multiplier, clip norm), attempts and time.

The database uses a rollback journal with ``synchronous=FULL`` (a commit survives a power
cut) and no memory mapping at all (``mmap_size=0``; no WAL, whose shared-memory index is
an mmapped file): a state directory that turns read-only or full mid-run then fails a
write with an error instead of killing the process with SIGBUS. Every storage failure is
a :class:`StateError` naming the directory and the cause; the transaction of the failed
commit is rolled back, so the database keeps the last committed round.

One coordinator at a time runs on a state directory: :class:`StateDirLock` holds an
exclusive ``flock`` on ``state_dir/coordinator.lock`` (released by the kernel when the
process dies, so a crash never leaves a stale lock). Readers such as ``biofed status``
read the database without the lock.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import math
import os
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "ROUND_COLUMNS",
    "SCHEMA_VERSION",
    "CoordinatorState",
    "RoundRecord",
    "Snapshot",
    "StateDirLock",
    "StateError",
    "running_coordinator",
]

SCHEMA_VERSION = 1
DB_NAME = "coordinator.sqlite"


class StateError(RuntimeError):
    """The state database is unusable (other fleet, newer schema, corrupt) or cannot be
    written (read-only or full state directory, I/O error)."""


def _storage_error(path: Path, action: str, exc: BaseException) -> StateError:
    return StateError(
        f"{path}: cannot {action}: {exc}; the state directory must be writable and have free space "
        "(nothing after the last committed round is kept; fix the directory and restart to resume)"
    )


def _probe_writable(directory: Path) -> None:
    """Write, sync and delete a small file in ``directory``: read-only or full fails here,
    at start, rather than in the first commit."""
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"\0" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise _storage_error(directory, "write the state directory", exc) from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


@dataclass
class Snapshot:
    """Everything needed to resume a federation after the last committed round."""

    next_round: int = 1
    """Round number the next task will carry (task round numbers are never reused)."""
    phase: str = "moments"
    """moments | covariance | train | evaluate | done."""
    train_rounds_done: int = 0
    basis_version: int = 0
    n_features: int | None = None
    clip_norm: float = 1.0
    stop_reason: str = ""
    ledger: str | None = None
    """PrivacyLedger JSON (None before the first round)."""
    params: np.ndarray | None = None
    stats_mean: np.ndarray | None = None
    stats_scale: np.ndarray | None = None
    basis_components: np.ndarray | None = None
    basis_mean: np.ndarray | None = None
    basis_scale: np.ndarray | None = None
    strategy_state: dict[str, np.ndarray] = field(default_factory=dict)


_SCALARS = (
    "next_round",
    "phase",
    "train_rounds_done",
    "basis_version",
    "n_features",
    "clip_norm",
    "stop_reason",
    "ledger",
)
_ARRAYS = ("params", "stats_mean", "stats_scale", "basis_components", "basis_mean", "basis_scale")
_STRATEGY_PREFIX = "strategy."


@dataclass(frozen=True)
class RoundRecord:
    """Metrics of one closed round (a row of ``rounds``)."""

    round: int
    phase: str
    train_round: int | None
    n_selected: int
    n_devices: int
    mean_loss: float | None
    balanced_accuracy: float | None
    eval_windows: int
    epsilon_rdp: float | None
    epsilon_pld: float | None
    sampling_rate: float | None
    noise_multiplier: float | None
    clip_norm: float | None
    attempts: int
    finished: float

    def to_json_dict(self) -> dict:
        """Plain JSON-safe dict: non-finite floats (an epsilon of a noise-free run) become the
        strings ``"inf"``/``"nan"`` so the file stays standard JSON."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                value = str(value)
            out[f.name] = value
        return out


ROUND_COLUMNS = tuple(f.name for f in fields(RoundRecord))


def _to_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def _from_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class StateDirLock:
    """An exclusive lock on a state directory: a second coordinator on it fails at once.

    Raises
    ------
    StateError
        Another process (or another :class:`StateDirLock` in this one) holds the lock, or
        the state directory cannot be written (read-only, full).
    """

    NAME = "coordinator.lock"

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / self.NAME
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _storage_error(self.path.parent, "write the state directory", exc) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = None
            raise StateError(
                f"another coordinator (pid {holder}) is running on {self.path.parent}; stop it first, or give this "
                "one its own state_dir"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Unlock (idempotent); the file stays, its content is only informative."""
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def running_coordinator(state_dir: str | Path) -> int | None:
    """The pid of the coordinator holding ``state_dir``'s :class:`StateDirLock`, or None
    when none runs there (the lock is probed, never taken for longer than the probe)."""
    path = Path(state_dir) / StateDirLock.NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)
    return None


class CoordinatorState:
    """The coordinator's SQLite state under ``state_dir``.

    Thread-safe (one connection behind a lock): the round loop writes while another
    thread may read :meth:`history`.

    Parameters
    ----------
    state_dir : path
        Created if missing.
    fleet : str
        The fleet this state belongs to; opening another fleet's state raises
        :class:`StateError`.
    """

    def __init__(self, state_dir: str | Path, fleet: str) -> None:
        self.state_dir = Path(state_dir)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _storage_error(self.state_dir, "create the state directory", exc) from None
        _probe_writable(self.state_dir)
        self.path = self.state_dir / DB_NAME
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
            self._db.execute("PRAGMA mmap_size=0")
            mode = self._db.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
            if mode.lower() != "delete":
                raise StateError(f"{self.path}: SQLite kept journal mode {mode!r}; put the state on a local disk")
            self._db.execute("PRAGMA synchronous=FULL")
            self._create(fleet)
        except sqlite3.DatabaseError as exc:
            raise StateError(f"{self.path}: cannot open the coordinator state database: {exc}") from None

    def _create(self, fleet: str) -> None:
        columns = ", ".join(f"{name} {'INTEGER PRIMARY KEY' if name == 'round' else ''}" for name in ROUND_COLUMNS)
        with self._lock:
            self._db.executescript(
                f"""
                BEGIN;
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS scalars (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS arrays (name TEXT PRIMARY KEY, data BLOB NOT NULL);
                CREATE TABLE IF NOT EXISTS accepted (
                    message_id TEXT PRIMARY KEY, round INTEGER NOT NULL, device_id TEXT NOT NULL, kind TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS rounds ({columns});
                INSERT OR IGNORE INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}');
                COMMIT;
                """
            )
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('fleet', ?)", (fleet,))
            meta = dict(self._db.execute("SELECT key, value FROM meta"))
        if int(meta["schema_version"]) != SCHEMA_VERSION:
            raise StateError(
                f"{self.path} has schema version {meta['schema_version']}, this coordinator reads {SCHEMA_VERSION}; "
                "use a matching biofed version or a new state_dir"
            )
        if meta["fleet"] != fleet:
            raise StateError(
                f"{self.path} holds the state of fleet {meta['fleet']!r}, not {fleet!r}; use another state_dir"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ reading
    def load(self) -> Snapshot | None:
        """The last committed snapshot, or None for a fresh state directory."""
        with self._lock:
            scalars = {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM scalars")}
            arrays = {name: _from_npy(data) for name, data in self._db.execute("SELECT name, data FROM arrays")}
        if not scalars:
            return None
        snapshot = Snapshot(**{k: scalars[k] for k in _SCALARS if k in scalars})
        for name in _ARRAYS:
            setattr(snapshot, name, arrays.get(name))
        snapshot.strategy_state = {
            name[len(_STRATEGY_PREFIX) :]: value for name, value in arrays.items() if name.startswith(_STRATEGY_PREFIX)
        }
        return snapshot

    def accepted_ids(self) -> list[str]:
        """Message ids of every committed update and sketch."""
        with self._lock:
            return [row[0] for row in self._db.execute("SELECT message_id FROM accepted")]

    def history(self) -> list[RoundRecord]:
        """Closed rounds in order (basis phases, training rounds, evaluation)."""
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(ROUND_COLUMNS)} FROM rounds ORDER BY round").fetchall()
        return [RoundRecord(*row) for row in rows]

    # ------------------------------------------------------------------ writing
    def reserve_round(self, next_round: int) -> None:
        """Persist that round numbers below ``next_round`` are used (called when a task is
        published, so a restarted coordinator never re-issues a task round number)."""
        with self._lock:
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO scalars VALUES ('next_round', ?)", (json.dumps(int(next_round)),)
                )
            except sqlite3.Error as exc:
                raise _storage_error(self.path, f"reserve round numbers below {next_round}", exc) from None

    def write_ledger(self, ledger_json: str) -> None:
        """Persist the privacy ledger alone, at once (the write-ahead charge of
        :class:`biofed.privacy_mechanism.PrivacyMechanism`: durable before the release is
        published; a later :meth:`commit_round` writes the same ledger with the round)."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO scalars VALUES ('ledger', ?)", (json.dumps(str(ledger_json)),))

    def commit_round(
        self,
        snapshot: Snapshot,
        *,
        accepted: Iterable[tuple[str, int, str, str]] = (),
        record: RoundRecord | None = None,
    ) -> None:
        """Write ``snapshot``, the accepted ``(message_id, round, device_id, kind)`` and the
        round's metrics in one transaction (all or nothing)."""
        scalars = [(k, json.dumps(getattr(snapshot, k))) for k in _SCALARS]
        arrays = [(name, _to_npy(getattr(snapshot, name))) for name in _ARRAYS if getattr(snapshot, name) is not None]
        arrays += [(_STRATEGY_PREFIX + k, _to_npy(v)) for k, v in snapshot.strategy_state.items()]
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("DELETE FROM scalars")
                self._db.executemany("INSERT INTO scalars VALUES (?, ?)", scalars)
                self._db.execute("DELETE FROM arrays")
                self._db.executemany("INSERT INTO arrays VALUES (?, ?)", arrays)
                self._db.executemany("INSERT OR IGNORE INTO accepted VALUES (?, ?, ?, ?)", list(accepted))
                if record is not None:
                    placeholders = ", ".join("?" for _ in ROUND_COLUMNS)
                    self._db.execute(
                        f"INSERT OR REPLACE INTO rounds ({', '.join(ROUND_COLUMNS)}) VALUES ({placeholders})",
                        tuple(getattr(record, c) for c in ROUND_COLUMNS),
                    )
                self._db.execute("COMMIT")
            except BaseException as exc:
                if self._db.in_transaction:
                    try:
                        self._db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # SQLite rolled back already (e.g. after a full disk)
                if isinstance(exc, sqlite3.Error):
                    raise _storage_error(self.path, "commit the round", exc) from None
                raise

    def write_rounds_json(self) -> Path:
        """Write ``state_dir/rounds.json`` (the :meth:`history` as a list of dicts)."""
        path = self.state_dir / "rounds.json"
        tmp = path.with_suffix(".json.tmp")
        try:
            tmp.write_text(json.dumps([r.to_json_dict() for r in self.history()], indent=1))
            tmp.replace(path)
        except OSError as exc:
            raise _storage_error(path, "write the round history", exc) from None
        return path
