"""Storage faults are loud: a full or read-only state directory, at start or mid-run, gives a
StateError naming the directory (a clean exit of the CLI), never a SIGBUS, and the last
committed round stays intact.

Real faults need a real file system: each case runs in a child process inside its own
mount namespace (``unshare -m``, root) on a small tmpfs, which it fills or remounts
read-only. Where mount namespaces are not available the tests skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _can_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _can_mount(), reason="needs root and mount namespaces (unshare -m)")


def run_on_tmpfs(tmp_path: Path, size: str, script: str, *, shell_after_mount: str = "") -> subprocess.CompletedProcess:
    """Run ``script`` (Python; ``STATE`` is the mount point) with a fresh ``size`` tmpfs at STATE."""
    state = tmp_path / "state"
    state.mkdir()
    code = tmp_path / "child.py"
    code.write_text(f"STATE = {str(state)!r}\n" + textwrap.dedent(script))
    command = f"mount -t tmpfs -o size={size} tmpfs {state} && {shell_after_mount} exec {sys.executable} {code}"
    return subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True, text=True, timeout=300, cwd=ROOT)


def _assert_clean(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode} (SIGBUS is -7/135)\n{result.stdout}\n{result.stderr}"
    assert "OK" in result.stdout


COMMON = """
import subprocess
import numpy as np
from biofed.coordinator.state import CoordinatorState, Snapshot, StateError

def snapshot(n, size):
    return Snapshot(next_round=n + 1, phase="train", train_rounds_done=n, params=np.full(size, float(n)))
"""


def test_full_state_directory_fails_the_commit_loudly_and_keeps_the_last_round(tmp_path):
    result = run_on_tmpfs(
        tmp_path,
        "512k",
        COMMON
        + """
store = CoordinatorState(STATE, "ward7")
store.commit_round(snapshot(1, 1000))
committed = 1
try:
    for n in range(2, 200):
        store.commit_round(snapshot(n, 4000 * n))  # grows until the file system is full
        committed = n
except StateError as exc:
    message = str(exc)
    assert STATE in message and "cannot commit the round" in message, message
    assert "full" in message, message
else:
    raise SystemExit("the file system never filled")
store.close()
import sqlite3
from pathlib import Path
db = sqlite3.connect(Path(STATE) / "coordinator.sqlite")  # a full disk still reads
rounds_done = dict(db.execute("SELECT key, value FROM scalars"))["train_rounds_done"]
assert int(rounds_done) == committed, (rounds_done, committed)
print("OK", committed)
""",
    )
    _assert_clean(result)


def test_state_directory_turning_read_only_mid_run_fails_the_commit_loudly(tmp_path):
    result = run_on_tmpfs(
        tmp_path,
        "8m",
        COMMON
        + """
store = CoordinatorState(STATE, "ward7")
store.commit_round(snapshot(1, 1000))
# Linux refuses to remount a file system read-only while a file on it is open for writing, so
# a read-only file system is mounted over the directory: the open database file stays on the
# old one, every file SQLite creates beside it (its journal) lands on the read-only one.
subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", STATE], check=True)
for attempt in (lambda: store.reserve_round(5), lambda: store.commit_round(snapshot(2, 1000)),
                store.write_rounds_json):
    try:
        attempt()
    except StateError as exc:
        assert STATE in str(exc) and "must be writable" in str(exc), str(exc)
        assert "read-only" in str(exc).lower() or "readonly" in str(exc).lower(), str(exc)
    else:
        raise SystemExit("a write to a read-only state directory succeeded")
assert store.load().train_rounds_done == 1  # the committed round is still readable
store.close()
try:
    CoordinatorState(STATE, "ward7")
except StateError as exc:
    assert "cannot write the state directory" in str(exc) and "Read-only file system" in str(exc), str(exc)
else:
    raise SystemExit("a read-only state directory opened for writing")
print("OK")
""",
    )
    _assert_clean(result)


@pytest.mark.slow
def test_coordinator_cli_exits_cleanly_on_a_read_only_state_directory(tmp_path):
    config = tmp_path / "coordinator.toml"
    config.write_text(
        textwrap.dedent(f"""
        fleet = "ward7"
        state_dir = "{tmp_path / "state"}"
        min_devices = 1
        rounds = 1
        [broker]
        host = "127.0.0.1"
        port = 1
        [model]
        classes = ["rest", "task"]
    """)
    )
    result = run_on_tmpfs(
        tmp_path,
        "1m",
        f"""
import subprocess, sys
run = subprocess.run([sys.executable, "-m", "biofed", "coordinator", "--config", {str(config)!r}],
                     capture_output=True, text=True, timeout=120)
print(run.stdout)
print(run.stderr)
assert run.returncode == 1, run.returncode
assert "state directory must be writable" in run.stderr and "Read-only file system" in run.stderr, run.stderr
assert "Traceback" not in run.stderr, run.stderr
print("OK")
""",
        shell_after_mount=f"mount -o remount,ro {tmp_path / 'state'} &&",
    )
    _assert_clean(result)
