"""The inbox between the MQTT network thread and the application: never blocks, sheds a
flooding sender's own oldest messages, rate-limits per sender, serves senders fairly."""

from __future__ import annotations

import threading
import time

import pytest

from biofed.inbox import Inbox, sender_of_topic


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_sender_of_topic():
    assert sender_of_topic("biofed/ward7/update/pi-01") == "pi-01"
    assert sender_of_topic("biofed/ward7/task") == "biofed/ward7/task"
    assert sender_of_topic("biofed/ward7/update/") == "biofed/ward7/update/"
    assert sender_of_topic("a/b/c/d/e") == "a/b/c/d/e"


def test_full_inbox_sheds_the_flooders_oldest_and_keeps_everybody_elses():
    inbox = Inbox(10, rate_per_s=None)
    assert inbox.put("biofed/f/status/honest", "status")
    for i in range(100):
        assert inbox.put("biofed/f/update/flood", f"junk-{i}")
    assert inbox.put("biofed/f/update/honest", "update")  # arrives after the flood filled the inbox
    assert len(inbox) == 10
    assert inbox.shed[("inbox full", "flood")] == 92  # 101 arrivals, room for 10 with the 2 honest ones
    assert inbox.shed_total() == inbox.shed_total("inbox full") == 92
    items = [inbox.get(0) for _ in range(10)]
    assert inbox.get(0) is None
    # round-robin across senders: the honest device's two messages come out early, in order
    assert items[0] == "status" and "update" in items[:4]
    flood = [x for x in items if x.startswith("junk")]
    assert flood == [f"junk-{i}" for i in range(92, 100)]  # the newest survive, oldest shed first


def test_arriving_sender_with_the_longest_backlog_sheds_its_own_oldest():
    inbox = Inbox(4, rate_per_s=None)
    for i in range(2):
        inbox.put("biofed/f/update/a", f"a{i}")
        inbox.put("biofed/f/update/b", f"b{i}")
    inbox.put("biofed/f/update/a", "a2")  # a and b tie: the arriving sender pays
    assert inbox.shed == {("inbox full", "a"): 1}
    assert sorted(inbox.get(0) for _ in range(4)) == ["a1", "a2", "b0", "b1"]


def test_rate_limit_per_sender_with_burst_and_refill():
    clock = FakeClock()
    inbox = Inbox(1000, rate_per_s=2.0, burst=5, clock=clock)
    accepted = [inbox.put("biofed/f/update/x", i) for i in range(8)]
    assert accepted == [True] * 5 + [False] * 3
    assert inbox.put("biofed/f/update/y", "other")  # another sender has its own bucket
    clock.now = 1.0  # two tokens refilled
    assert [inbox.put("biofed/f/update/x", i) for i in range(3)] == [True, True, False]
    assert inbox.shed_total("rate limit") == 4


def test_put_never_blocks_and_get_waits():
    inbox = Inbox(1, rate_per_s=None)
    start = time.monotonic()
    for i in range(10_000):
        inbox.put("biofed/f/update/x", i)
    assert time.monotonic() - start < 5.0  # bounded work per put, no waiting
    assert inbox.get(0) == 9_999
    got = []
    reader = threading.Thread(target=lambda: got.append(inbox.get(5.0)))
    reader.start()
    time.sleep(0.05)
    inbox.put("biofed/f/update/x", "late")
    reader.join(5.0)
    assert got == ["late"]
    assert inbox.get(0.01) is None


@pytest.mark.parametrize("kwargs", [{"capacity": 0}, {"capacity": 5, "rate_per_s": 0}, {"capacity": 5, "burst": 0}])
def test_bad_settings_are_refused(kwargs):
    capacity = kwargs.pop("capacity")
    with pytest.raises(ValueError, match="capacity|rate_per_s"):
        Inbox(capacity, **kwargs)
