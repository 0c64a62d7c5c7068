"""On-device feature store: one SQLite row per feature window.

A device keeps the feature rows it computed so that it can train locally whenever the
coordinator opens a round. The store is a single SQLite file (stdlib :mod:`sqlite3`):

- **Durability.** The database runs in WAL mode with ``synchronous=FULL`` and every
  :meth:`FeatureStore.append` is one transaction, so a crash or a power loss loses at most
  the batch being appended (one window when rows are appended as they are produced);
  everything committed before stays readable and the file stays consistent.
- **Bounded size.** ``max_rows`` caps the number of rows; the oldest rows (insertion
  order) are evicted in the same transaction that inserts new ones, so the cap holds at
  every commit.
- **Layouts never mix.** Every row carries a layout hash (see
  ``biofed.model.FeatureLayout.hash``) and the width of each layout is recorded
  once. A store opened for one layout reads only that layout's rows; appending a matrix of
  another width under the same layout is an error.
- **The device's own records.** Beside the rows, the file keeps what a restarted device
  needs to resume: the *ingestion ledger* (which recordings were ingested, which stream was
  interrupted), the JSON feature layout of each layout hash, and the device's privacy
  ledgers. Every statement on the file lives in this module.

Schema::

    layouts(hash TEXT PRIMARY KEY, n_features INTEGER)
    windows(id INTEGER PRIMARY KEY AUTOINCREMENT, t REAL, source TEXT, label TEXT,
            layout TEXT, features BLOB)   -- features: little-endian float64, n_features values
    agent_ingested(path TEXT PRIMARY KEY, stream TEXT, done INTEGER, n_rows INTEGER,
                   finished REAL)         -- one row per recording file of an ingested stream
    agent_layout(hash TEXT PRIMARY KEY, layout TEXT)       -- FeatureLayout JSON per layout hash
    agent_privacy_ledger(id INTEGER PRIMARY KEY, ledger TEXT)  -- 1 client-level, 2 record-level
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from biofed.kernels._validation import first_nonfinite

__all__ = ["FeatureStore", "PRIVACY_LEDGERS", "StoreError"]

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS layouts (
    hash TEXT PRIMARY KEY,
    n_features INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS windows (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    t REAL NOT NULL,
    source TEXT NOT NULL,
    label TEXT,
    layout TEXT NOT NULL REFERENCES layouts(hash),
    features BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS windows_layout ON windows(layout, id);
CREATE TABLE IF NOT EXISTS agent_ingested (
    path TEXT PRIMARY KEY,
    stream TEXT NOT NULL,
    done INTEGER NOT NULL,
    n_rows INTEGER NOT NULL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS agent_layout (
    hash TEXT PRIMARY KEY,
    layout TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS agent_privacy_ledger (
    id INTEGER PRIMARY KEY CHECK (id IN (1, 2)),
    ledger TEXT NOT NULL
);
"""

PRIVACY_LEDGERS = {"client": 1, "record": 2}
"""The device's privacy ledgers and their rows in ``agent_privacy_ledger``: the client-level
ledger (releases in local and distributed trust modes) and the record-level one (DP-SGD)."""

_BLOB_DTYPE = np.dtype("<f8")
_READ_BLOCK_ROWS = 1024


class StoreError(ValueError):
    """Bad input to, or an unusable state of, a :class:`FeatureStore` (the message says which)."""


class FeatureStore:
    """SQLite feature store holding one row per feature window.

    Parameters
    ----------
    path : str or Path
        The database file (created with its parent folder when absent).
    max_rows : int, default 100_000
        Most rows kept (over every layout); the oldest are evicted first, in the same
        transaction as the insert that overflows the cap.
    layout_hash : str or None
        The feature layout this store reads and writes (``FeatureLayout.hash``, or
        ``StreamingPipeline.row_layout_hash`` for projected rows). ``None`` adopts the layout
        of the newest stored row, or, for an empty store, ``"width=F"`` of the first append.

    Notes
    -----
    ``read`` returns labels as a str array with ``""`` for unlabelled windows (appended with
    label ``None``). The connection is guarded by a lock, so one store object can be shared by
    threads (e.g. an asyncio agent offloading writes with ``asyncio.to_thread``).

    Examples
    --------
    >>> with FeatureStore(tmp / "features.sqlite", max_rows=10_000) as store:  # doctest: +SKIP
    ...     store.append(X, labels, t)
    ...     X, labels, t = store.read()
    """

    def __init__(self, path: str | Path, *, max_rows: int = 100_000, layout_hash: str | None = None) -> None:
        if isinstance(max_rows, bool) or not isinstance(max_rows, (int, np.integer)) or max_rows < 1:
            raise StoreError(f"max_rows must be an integer >= 1, got {max_rows!r}.")
        if layout_hash is not None and (not isinstance(layout_hash, str) or not layout_hash):
            raise StoreError(f"layout_hash must be a non-empty str or None, got {layout_hash!r}.")
        self.path = Path(path)
        self.max_rows = int(max_rows)
        self._layout = layout_hash
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open feature store {self.path}: {exc}") from exc
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); put the store on a local disk.")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"{self.path} is not a usable feature store: {exc}") from exc
        except StoreError:
            conn.close()
            raise
        self._conn: sqlite3.Connection | None = conn

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"feature store {self.path} is closed; open a new FeatureStore.")
        return self._conn

    # ------------------------------------------------------------------ layout
    @property
    def layout_hash(self) -> str | None:
        """The layout this store reads and writes (``None`` while an anonymous store is empty)."""
        with self._lock:
            return self._current_layout(self._connection())

    def _current_layout(self, conn: sqlite3.Connection) -> str | None:
        if self._layout is None:
            row = conn.execute("SELECT layout FROM windows ORDER BY id DESC LIMIT 1").fetchone()
            if row is not None:
                self._layout = row[0]
        return self._layout

    def bind_layout(self, layout_hash: str) -> bool:
        """Make the store read and write ``layout_hash``.

        True when it does (already, or from now on: an anonymous store without rows adopts
        it); False when it holds rows of another layout, which is left unchanged.
        """
        if not isinstance(layout_hash, str) or not layout_hash:
            raise StoreError(f"layout_hash must be a non-empty str, got {layout_hash!r}.")
        with self._lock:
            current = self._current_layout(self._connection())
            if current is None:
                self._layout = layout_hash
                return True
            return current == layout_hash

    def layout_spec_json(self, layout_hash: str) -> str:
        """The JSON feature layout recorded for ``layout_hash`` (see :meth:`save_layout_spec`); "" if none."""
        with self._lock:
            row = (
                self._connection().execute("SELECT layout FROM agent_layout WHERE hash = ?", (layout_hash,)).fetchone()
            )
        return row[0] if row else ""

    def save_layout_spec(self, layout_hash: str, spec_json: str) -> None:
        """Record the JSON feature layout (``biofed.model.FeatureLayout``) of ``layout_hash``,
        so that a restarted device that ingests nothing new still knows its layout."""
        with self._lock:
            self._connection().execute(
                "INSERT OR REPLACE INTO agent_layout(hash, layout) VALUES (?, ?)", (layout_hash, spec_json)
            )

    # ------------------------------------------------------------------ ingestion ledger
    def ingested_paths(self) -> set[str]:
        """The recording files whose stream was ingested completely."""
        with self._lock:
            rows = self._connection().execute("SELECT path FROM agent_ingested WHERE done = 1").fetchall()
        return {row[0] for row in rows}

    def begin_stream(self, paths: Sequence[str | Path], stream: str) -> None:
        """Mark the files of ``stream`` as being ingested, before its first row is appended
        (its rows carry ``source = stream``); :meth:`recover_interrupted` undoes an unfinished one."""
        self._mark_stream(paths, stream, done=False, n_rows=0)

    def finish_stream(self, paths: Sequence[str | Path], stream: str, n_rows: int) -> None:
        """Mark the files of ``stream`` as ingested (``n_rows`` windows), after its last row was appended."""
        self._mark_stream(paths, stream, done=True, n_rows=n_rows)

    def _mark_stream(self, paths: Sequence[str | Path], stream: str, *, done: bool, n_rows: int) -> None:
        finished = time.time() if done else None
        with self._lock:
            self._connection().executemany(
                "INSERT OR REPLACE INTO agent_ingested(path, stream, done, n_rows, finished) VALUES (?, ?, ?, ?, ?)",
                [(str(p), stream, int(done), int(n_rows), finished) for p in paths],
            )

    def recover_interrupted(self) -> dict[str, int]:
        """Delete the rows of every stream begun but not finished (over every layout) and forget
        it, in one transaction, so that replaying it neither duplicates nor loses windows.

        Returns the number of rows deleted per interrupted stream.
        """
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                pending = [row[0] for row in conn.execute("SELECT DISTINCT stream FROM agent_ingested WHERE done = 0")]
                deleted = {
                    stream: conn.execute("DELETE FROM windows WHERE source = ?", (stream,)).rowcount
                    for stream in pending
                }
                conn.execute("DELETE FROM agent_ingested WHERE done = 0")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return deleted

    def latest_time(self) -> float | None:
        """The largest window time stored (over every layout); None for an empty file."""
        with self._lock:
            row = self._connection().execute("SELECT MAX(t) FROM windows").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    # ------------------------------------------------------------------ privacy ledgers
    def privacy_ledger_json(self, name: str) -> str | None:
        """The stored JSON of the device's privacy ledger ``name`` (a key of :data:`PRIVACY_LEDGERS`); None if none."""
        row_id = self._ledger_row(name)
        with self._lock:
            row = (
                self._connection().execute("SELECT ledger FROM agent_privacy_ledger WHERE id = ?", (row_id,)).fetchone()
            )
        return None if row is None else row[0]

    def save_privacy_ledger_json(self, name: str, ledger_json: str) -> None:
        """Replace the device's privacy ledger ``name`` durably (one committed statement)."""
        row_id = self._ledger_row(name)
        with self._lock:
            self._connection().execute(
                "INSERT OR REPLACE INTO agent_privacy_ledger(id, ledger) VALUES (?, ?)", (row_id, ledger_json)
            )

    @staticmethod
    def _ledger_row(name: str) -> int:
        try:
            return PRIVACY_LEDGERS[name]
        except (KeyError, TypeError):
            raise StoreError(f"unknown privacy ledger {name!r}; expected one of {sorted(PRIVACY_LEDGERS)}.") from None

    # ------------------------------------------------------------------ writing
    def append(
        self,
        features,
        labels: Sequence[str | None],
        t,
        *,
        source: str | Sequence[str] = "",
    ) -> int:
        """Append feature windows in one durable transaction.

        Parameters
        ----------
        features : array-like, shape (N, F)
            Finite feature vectors (stored as float64).
        labels : sequence of str or None, length N
            The window labels (``None`` = unlabelled).
        t : array-like, shape (N,)
            Window timestamps in seconds (finite).
        source : str or sequence of str (length N)
            Where each window came from (file, sensor, stream id).

        Returns
        -------
        n_evicted : int
            How many old rows were evicted to respect ``max_rows``.

        Raises
        ------
        StoreError
            Wrong shapes, non-finite values, a width that differs from the layout's, or a
            closed store. Nothing is written then.
        """
        X = np.asarray(features)
        if X.dtype.kind not in "fiub":
            raise StoreError(f"features must be a real numeric array, got dtype {X.dtype}.")
        if X.ndim != 2:
            raise StoreError(
                f"features must be 2-D (N windows, F features), got shape {X.shape}; reshape(1, -1) a single row."
            )
        n, width = X.shape
        if width == 0:
            raise StoreError("features has 0 columns; a feature row needs at least one value.")
        X = np.ascontiguousarray(X, dtype=_BLOB_DTYPE)
        found = first_nonfinite(X)
        if found is not None:
            count, (row, column) = found
            raise StoreError(
                f"features contains {count} NaN/inf value(s), the first at row {row}, "
                f"column {column}; drop or repair such windows before storing them."
            )
        label_list = list(labels) if not isinstance(labels, str) else None
        if label_list is None or len(label_list) != n:
            got = "a single str" if label_list is None else f"{len(label_list)} labels"
            raise StoreError(f"labels must be a sequence of {n} str/None (one per row), got {got}.")
        for i, lab in enumerate(label_list):
            if lab is not None and not isinstance(lab, (str, np.str_)):
                raise StoreError(f"labels[{i}] must be a str or None, got {type(lab).__name__} {lab!r}.")
        times = np.asarray(t, dtype=np.float64).reshape(-1) if np.ndim(t) <= 1 else None
        if times is None or times.shape != (n,):
            raise StoreError(f"t must have shape ({n},) (one timestamp per row), got shape {np.shape(t)}.")
        if not np.isfinite(times).all():
            raise StoreError("t contains NaN/inf timestamps; every window needs a finite time in seconds.")
        if isinstance(source, str):
            sources = [source] * n
        else:
            sources = [str(s) for s in source]
            if len(sources) != n:
                raise StoreError(f"source must be one str or {n} str (one per row), got {len(sources)}.")
        if n == 0:
            return 0
        start = max(0, n - self.max_rows)  # rows that would be evicted at once are never written
        rows = [
            (float(times[i]), sources[i], None if label_list[i] is None else str(label_list[i]), X[i].tobytes())
            for i in range(start, n)
        ]
        with self._lock:
            conn = self._connection()
            layout = self._current_layout(conn) or f"width={width}"
            conn.execute("BEGIN IMMEDIATE")
            try:
                known = conn.execute("SELECT n_features FROM layouts WHERE hash = ?", (layout,)).fetchone()
                if known is None:
                    conn.execute("INSERT INTO layouts(hash, n_features) VALUES (?, ?)", (layout, width))
                elif known[0] != width:
                    raise StoreError(
                        f"features have {width} columns but layout {layout!r} of {self.path} has {known[0]}; "
                        "rows of different feature layouts never mix: open the store with the right layout_hash "
                        "or use another file."
                    )
                conn.executemany(
                    "INSERT INTO windows(t, source, label, layout, features) VALUES (?, ?, ?, ?, ?)",
                    [(r[0], r[1], r[2], layout, r[3]) for r in rows],
                )
                total = conn.execute("SELECT COUNT(*) FROM windows").fetchone()[0]
                excess = total - self.max_rows
                if excess > 0:
                    conn.execute(
                        "DELETE FROM windows WHERE id IN (SELECT id FROM windows ORDER BY id LIMIT ?)", (excess,)
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._layout = layout
        evicted = max(0, excess) + start
        if evicted:
            logger.debug("feature store %s: evicted %d oldest row(s) (max_rows=%d)", self.path, evicted, self.max_rows)
        return evicted

    def clear(self) -> int:
        """Delete every row of this store's layout; returns how many were deleted."""
        with self._lock:
            conn = self._connection()
            layout = self._current_layout(conn)
            if layout is None:
                return 0
            conn.execute("BEGIN IMMEDIATE")
            try:
                deleted = conn.execute("DELETE FROM windows WHERE layout = ?", (layout,)).rowcount
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return deleted

    # ------------------------------------------------------------------ reading
    def read(
        self, limit: int | None = None, *, labels: Sequence[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Read the stored windows of this store's layout, oldest first.

        Parameters
        ----------
        limit : int or None
            Return only the newest ``limit`` windows (still oldest first); ``None`` = all.
        labels : sequence of str or None
            Return only the windows labelled with one of ``labels`` (a task's classes: the
            other rows are then never read); ``None`` = every window, unlabelled ones included.

        Returns
        -------
        X : ndarray, shape (N, F), float64
        labels : ndarray, shape (N,), str (``""`` = unlabelled)
        t : ndarray, shape (N,), float64
        """
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0):
            raise StoreError(f"limit must be None or an integer >= 0, got {limit!r}.")
        if isinstance(labels, str):
            raise StoreError(f"labels must be a sequence of labels (a task's classes), got the string {labels!r}.")
        with self._lock:
            conn = self._connection()
            layout = self._current_layout(conn)
            if layout is None:
                return np.empty((0, 0)), np.empty(0, dtype=str), np.empty(0)
            width = conn.execute("SELECT n_features FROM layouts WHERE hash = ?", (layout,)).fetchone()
            width = 0 if width is None else int(width[0])
            where = "layout = ?"
            params: tuple = (layout,)
            if labels is not None:
                labels = [str(label) for label in labels]
                where += f" AND label IN ({', '.join('?' * len(labels))})"
                params += tuple(labels)
            sql = f"SELECT t, label, features FROM windows WHERE {where} ORDER BY id DESC"
            if limit is not None:
                sql += " LIMIT ?"
            # X is filled in place, block by block (newest first, from its end), so reading
            # the whole store holds one float64 copy of it rather than the rows, their
            # joined bytes and the array at once. One read transaction: the count and the
            # rows see the same snapshot.
            conn.execute("BEGIN")
            try:
                (n,) = conn.execute(f"SELECT COUNT(*) FROM windows WHERE {where}", params).fetchone()
                n = n if limit is None else min(n, int(limit))
                X = np.empty((n, width), dtype=np.float64)
                t = np.empty(n, dtype=np.float64)
                row_labels: list[str] = []
                end = n
                cursor = conn.execute(sql, params if limit is None else (*params, int(limit)))
                while block := cursor.fetchmany(_READ_BLOCK_ROWS):
                    start = end - len(block)
                    X[start:end] = np.frombuffer(b"".join(r[2] for r in block), dtype=_BLOB_DTYPE).reshape(
                        len(block), width
                    )[::-1]
                    t[start:end] = [r[0] for r in reversed(block)]
                    row_labels.extend("" if r[1] is None else r[1] for r in block)
                    end = start
            finally:
                conn.execute("COMMIT")
        row_labels.reverse()
        return X, np.array(row_labels, dtype=str), t

    def __len__(self) -> int:
        """Number of stored windows of this store's layout."""
        with self._lock:
            conn = self._connection()
            layout = self._current_layout(conn)
            if layout is None:
                return 0
            return int(conn.execute("SELECT COUNT(*) FROM windows WHERE layout = ?", (layout,)).fetchone()[0])

    def integrity_check(self) -> bool:
        """Run ``PRAGMA integrity_check``; True when SQLite reports the file ``ok``."""
        with self._lock:
            result = self._connection().execute("PRAGMA integrity_check").fetchall()
        ok = result == [("ok",)]
        if not ok:
            logger.error("feature store %s failed its integrity check: %s", self.path, result[:5])
        return ok

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else f"layout={self._layout!r}"
        return f"FeatureStore({str(self.path)!r}, max_rows={self.max_rows}, {state})"
