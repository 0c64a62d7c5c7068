"""FeatureStore: durability under SIGKILL, eviction order, layouts, bad input."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from biofed.edge.store import FeatureStore, StoreError

F = 6


def _row(i: int) -> np.ndarray:
    return i * 10.0 + np.arange(F, dtype=np.float64) / 7.0


def test_roundtrip_is_exact_and_ordered(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(25, F))
    labels = ["rest", "arithmetic", None, "rest", "rest"] * 5
    t = np.arange(25) * 1.5
    with FeatureStore(tmp_path / "s.sqlite", max_rows=100) as store:
        assert len(store) == 0
        X0, y0, t0 = store.read()
        assert X0.shape[0] == 0 and y0.shape == (0,) and t0.shape == (0,)
        store.append(X[:10], labels[:10], t[:10], source="dev-a")
        store.append(X[10:], labels[10:], t[10:], source=[f"s{i}" for i in range(15)])
        assert len(store) == 25
        Xr, yr, tr = store.read()
        np.testing.assert_array_equal(Xr, X)  # float64 blobs round-trip bit for bit
        assert list(yr) == ["" if lab is None else lab for lab in labels]
        np.testing.assert_array_equal(tr, t)
        Xl, yl, tl = store.read(limit=4)
        np.testing.assert_array_equal(Xl, X[-4:])
        np.testing.assert_array_equal(tl, t[-4:])
        # a task's classes only: the unlabelled and other rows are not read
        kept = np.array([lab in ("rest", "other") for lab in labels])
        Xc, yc, tc = store.read(labels=("rest", "other"))
        np.testing.assert_array_equal(Xc, X[kept])
        assert list(yc) == ["rest"] * int(kept.sum())
        np.testing.assert_array_equal(tc, t[kept])
        Xc, yc, tc = store.read(limit=2, labels=["arithmetic"])
        np.testing.assert_array_equal(Xc, X[[16, 21]])
        assert list(yc) == ["arithmetic"] * 2 and list(tc) == [t[16], t[21]]
        assert store.read(labels=[])[0].shape == (0, F)
        assert store.integrity_check()
    # WAL + synchronous=FULL are what the durability promise rests on.
    conn = sqlite3.connect(tmp_path / "s.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_float32_input_is_stored_as_float64(tmp_path):
    X = np.linspace(0, 1, 12, dtype=np.float32).reshape(2, F)
    with FeatureStore(tmp_path / "s.sqlite") as store:
        store.append(X, ["a", "b"], [0.0, 1.0])
        Xr, _, _ = store.read()
    assert Xr.dtype == np.float64
    np.testing.assert_array_equal(Xr, X.astype(np.float64))


def test_cap_evicts_oldest_first_in_insertion_order(tmp_path):
    with FeatureStore(tmp_path / "s.sqlite", max_rows=7) as store:
        for i in range(5):
            assert store.append(_row(i)[None], [f"l{i}"], [float(i)]) == 0
        # 5 stored, append 4 -> 9 > 7: the two oldest (0, 1) go in the same transaction.
        evicted = store.append(
            np.stack([_row(i) for i in range(5, 9)]), [f"l{i}" for i in range(5, 9)], np.arange(5, 9.0)
        )
        assert evicted == 2
        assert len(store) == 7
        X, y, t = store.read()
        np.testing.assert_array_equal(t, np.arange(2, 9.0))
        assert list(y) == [f"l{i}" for i in range(2, 9)]
        np.testing.assert_array_equal(X, np.stack([_row(i) for i in range(2, 9)]))
        # A batch larger than the cap keeps its newest max_rows rows only.
        evicted = store.append(np.stack([_row(i) for i in range(100, 110)]), ["x"] * 10, np.arange(100, 110.0))
        assert evicted == 10
        _, _, t = store.read()
        np.testing.assert_array_equal(t, np.arange(103, 110.0))
    # The cap survives reopening with a smaller value: the next append trims to it.
    with FeatureStore(tmp_path / "s.sqlite", max_rows=3) as store:
        store.append(_row(200)[None], ["y"], [200.0])
        _, _, t = store.read()
        np.testing.assert_array_equal(t, [108.0, 109.0, 200.0])


def test_layouts_never_mix(tmp_path):
    path = tmp_path / "s.sqlite"
    with FeatureStore(path, layout_hash="raw-abc") as raw:
        raw.append(np.ones((3, F)), ["a"] * 3, [0.0, 1.0, 2.0])
        with pytest.raises(StoreError, match=r"features have 4 columns but layout 'raw-abc'.*has 6"):
            raw.append(np.ones((1, 4)), ["a"], [3.0])
        assert len(raw) == 3  # the rejected append wrote nothing
    with FeatureStore(path, layout_hash="projected-k4") as proj:
        assert len(proj) == 0
        proj.append(np.zeros((2, 4)), ["b", "b"], [5.0, 6.0])
        X, y, _ = proj.read()
        assert X.shape == (2, 4) and list(y) == ["b", "b"]
    with FeatureStore(path) as anonymous:  # adopts the newest row's layout
        assert anonymous.layout_hash == "projected-k4"
        assert len(anonymous) == 2
    with FeatureStore(path, layout_hash="raw-abc") as raw:
        X, _, _ = raw.read()
        assert X.shape == (3, F)
        assert raw.clear() == 3
        assert len(raw) == 0
    with FeatureStore(path, layout_hash="projected-k4") as proj:
        assert len(proj) == 2


def test_anonymous_layout_is_keyed_by_width(tmp_path):
    with FeatureStore(tmp_path / "s.sqlite") as store:
        assert store.layout_hash is None
        store.append(np.ones((1, 3)), ["a"], [0.0])
        assert store.layout_hash == "width=3"
        with pytest.raises(StoreError, match="features have 5 columns but layout 'width=3'"):
            store.append(np.ones((1, 5)), ["a"], [1.0])


@pytest.mark.parametrize(
    ("features", "labels", "t", "match"),
    [
        (np.ones(F), ["a"], [0.0], r"features must be 2-D .* reshape\(1, -1\)"),
        (np.ones((1, 0)), ["a"], [0.0], "0 columns"),
        (np.array([[1.0, np.nan, 2.0]]), ["a"], [0.0], r"1 NaN/inf value\(s\), the first at row 0, column 1"),
        (np.array([[1.0, np.inf, 2.0]]), ["a"], [0.0], "NaN/inf"),
        (np.array([["a", "b"]]), ["a"], [0.0], "real numeric array"),
        (np.ones((2, F)), ["a"], [0.0, 1.0], r"sequence of 2 str/None .* got 1 labels"),
        (np.ones((1, F)), "a", [0.0], "got a single str"),
        (np.ones((1, F)), [3], [0.0], r"labels\[0\] must be a str or None"),
        (np.ones((2, F)), ["a", "b"], [0.0], r"t must have shape \(2,\)"),
        (np.ones((1, F)), ["a"], [np.nan], "finite time"),
    ],
)
def test_bad_input_is_rejected_and_writes_nothing(tmp_path, features, labels, t, match):
    with FeatureStore(tmp_path / "s.sqlite") as store:
        store.append(np.ones((1, 3)), ["ok"], [0.0])
        with pytest.raises(StoreError, match=match):
            store.append(features, labels, t)
        assert len(store) == 1


def test_bad_arguments_and_closed_store(tmp_path):
    with pytest.raises(StoreError, match="max_rows must be an integer >= 1"):
        FeatureStore(tmp_path / "s.sqlite", max_rows=0)
    with pytest.raises(StoreError, match="layout_hash must be a non-empty str"):
        FeatureStore(tmp_path / "s.sqlite", layout_hash="")
    store = FeatureStore(tmp_path / "s.sqlite")
    with pytest.raises(StoreError, match="limit must be None or an integer >= 0"):
        store.read(limit=-1)
    with pytest.raises(StoreError, match="labels must be a sequence of labels"):
        store.read(labels="rest")
    with pytest.raises(StoreError, match="source must be one str or 2 str"):
        store.append(np.ones((2, 3)), ["a", "b"], [0.0, 1.0], source=["x"])
    store.close()
    store.close()
    with pytest.raises(StoreError, match="is closed"):
        len(store)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="not a usable feature store"):
        FeatureStore(garbage)


_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from biofed.edge.store import FeatureStore

    store = FeatureStore(sys.argv[1], max_rows=1_000_000, layout_hash="crash-test")
    i = 0
    while True:
        row = i * 10.0 + np.arange({F}, dtype=np.float64) / 7.0
        store.append(row[None], ["rest" if i % 2 else "arithmetic"], [float(i)], source="writer")
        i += 1
        print(i, flush=True)   # i rows are committed (fsynced) now
    """
).format(F=F)


@pytest.mark.slow
def test_sigkill_mid_stream_loses_at_most_the_window_in_progress(tmp_path):
    path = tmp_path / "crash.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    committed = 0
    try:
        for line in proc.stdout:
            committed = int(line)
            if committed >= 150:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert committed >= 150, "the writer died before committing its rows"

    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()
    with FeatureStore(path, layout_hash="crash-test") as store:
        assert store.integrity_check()
        n = len(store)
        # Every reported commit survived; at most the append in flight (and those the
        # writer finished but had not reported yet) differ.
        assert n >= committed
        X, labels, t = store.read()
        np.testing.assert_array_equal(t, np.arange(n, dtype=np.float64))
        np.testing.assert_array_equal(X, np.stack([_row(i) for i in range(n)]))
        assert list(labels[:4]) == ["arithmetic", "rest", "arithmetic", "rest"]
        # The store is writable again after the crash.
        store.append(_row(n)[None], ["rest"], [float(n)])
        assert len(store) == n + 1


# ----------------------------------------------------------------------------- the device's own records
def test_an_empty_store_binds_to_a_layout_and_keeps_it(tmp_path):
    path = tmp_path / "s.sqlite"
    with FeatureStore(path) as store:
        assert store.layout_hash is None
        assert store.bind_layout("layout-a") and store.layout_hash == "layout-a"
        assert store.bind_layout("layout-a")
        store.append(np.ones((2, F)), ["a", "b"], [0.0, 1.0])
    with FeatureStore(path) as store:  # an anonymous store adopts the newest row's layout
        assert not store.bind_layout("layout-b") and store.layout_hash == "layout-a"
        assert len(store) == 2
        with pytest.raises(StoreError, match="non-empty str"):
            store.bind_layout("")


def test_ingestion_ledger_survives_a_reopen_and_undoes_an_interrupted_stream(tmp_path):
    path = tmp_path / "s.sqlite"
    with FeatureStore(path) as store:
        store.begin_stream(["a.fif", "a.wav"], "a.fif+a.wav")
        store.append(np.ones((3, F)), ["rest"] * 3, [0.0, 1.0, 2.0], source="a.fif+a.wav")
        store.finish_stream(["a.fif", "a.wav"], "a.fif+a.wav", 3)
        store.begin_stream(["b.fif"], "b.fif")  # the device dies while this stream is stored
        store.append(np.ones((2, F)), ["task"] * 2, [6.0, 7.0], source="b.fif")
        assert store.ingested_paths() == {"a.fif", "a.wav"}
        assert store.latest_time() == 7.0
    with FeatureStore(path) as store:
        assert store.recover_interrupted() == {"b.fif": 2}
        assert store.recover_interrupted() == {}
        _, labels, t = store.read()
        assert list(labels) == ["rest"] * 3 and store.latest_time() == 2.0
        assert store.ingested_paths() == {"a.fif", "a.wav"}


def test_latest_time_of_an_empty_store_is_none(tmp_path):
    with FeatureStore(tmp_path / "s.sqlite") as store:
        assert store.latest_time() is None


def test_layout_specs_and_privacy_ledgers_are_kept_by_name(tmp_path):
    path = tmp_path / "s.sqlite"
    with FeatureStore(path) as store:
        assert store.layout_spec_json("layout-a") == ""
        store.save_layout_spec("layout-a", '{"window_s": 2.0}')
        assert store.privacy_ledger_json("client") is None
        store.save_privacy_ledger_json("client", '{"groups": [1]}')
        store.save_privacy_ledger_json("record", '{"groups": [2]}')
        store.save_privacy_ledger_json("client", '{"groups": [1, 1]}')
        with pytest.raises(StoreError, match="unknown privacy ledger 'server'"):
            store.save_privacy_ledger_json("server", "{}")
    with FeatureStore(path) as store:
        assert store.layout_spec_json("layout-a") == '{"window_s": 2.0}'
        assert store.privacy_ledger_json("client") == '{"groups": [1, 1]}'
        assert store.privacy_ledger_json("record") == '{"groups": [2]}'


def test_the_devices_records_need_an_open_store(tmp_path):
    store = FeatureStore(tmp_path / "s.sqlite")
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.ingested_paths()
    with pytest.raises(StoreError, match="closed"):
        store.save_privacy_ledger_json("client", "{}")
