"""The bounded inbox between an MQTT network thread and the application loop.

:meth:`Inbox.put` never blocks, so paho's network thread always returns at once, keeps
reading PUBACKs and pings, and the application's own publishes are never stuck behind a
full queue. Overload is shed by policy instead, per sender (the device id of a
per-device topic ``biofed/{fleet}/{kind}/{device_id}``, else the topic itself):

1. **Rate limit.** Each sender has a token bucket of ``burst`` messages refilled at
   ``rate_per_s``; a message arriving with the bucket empty is shed (reason
   ``"rate limit"``). An honest device sends a handful of messages per round, far below it.
2. **Capacity.** When ``capacity`` messages are queued, the *oldest* message of the sender
   with the most queued messages is shed to make room (reason ``"inbox full"``): a
   flooding sender loses its own backlog, the others keep theirs.

:meth:`Inbox.get` serves the senders round-robin, each in arrival order, so one sender's
backlog never delays another's update. Shed messages are counted per reason and sender
(:attr:`Inbox.shed`) and logged at most once per ``log_interval_s``. Messages the
application already took out of the inbox are never shed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

Item = TypeVar("Item")


def sender_of_topic(topic: str) -> str:
    """The device id of a per-device biofed topic (its fourth level), else the topic."""
    parts = topic.split("/", 4)
    return parts[3] if len(parts) == 4 and parts[3] else topic


class Inbox(Generic[Item]):
    """A non-blocking, per-sender fair, bounded queue (see the module docstring).

    Parameters
    ----------
    capacity : int
        Most messages held at once (>= 1).
    rate_per_s, burst : float
        Per-sender token bucket: sustained messages per second and the burst allowance.
        ``rate_per_s = None`` disables the rate limit.
    sender_of : callable
        ``topic -> sender key``.
    clock : callable
        Monotonic seconds (injectable for tests).
    log_interval_s : float
        Shedding is logged at most this often (with the counts since the last line).
    """

    def __init__(
        self,
        capacity: int,
        *,
        rate_per_s: float | None = 50.0,
        burst: float = 500.0,
        sender_of: Callable[[str], str] = sender_of_topic,
        clock: Callable[[], float] = time.monotonic,
        log_interval_s: float = 5.0,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"inbox capacity must be >= 1, got {capacity}")
        if rate_per_s is not None and not (rate_per_s > 0 and burst >= 1):
            raise ValueError(f"need rate_per_s > 0 and burst >= 1 (or rate_per_s=None), got {rate_per_s}, {burst}")
        self.capacity = int(capacity)
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self._sender_of = sender_of
        self._clock = clock
        self._log_interval_s = log_interval_s
        self._queues: OrderedDict[str, deque[tuple[str, Item]]] = OrderedDict()  # round-robin order
        self._buckets: dict[str, tuple[float, float]] = {}  # sender -> (tokens, time of last refill)
        self._size = 0
        self._cond = threading.Condition()
        self.shed: Counter[tuple[str, str]] = Counter()
        """Shed messages per ``(reason, sender)``."""
        self._unlogged: Counter[tuple[str, str]] = Counter()
        self._last_log = -float("inf")

    def __len__(self) -> int:
        with self._cond:
            return self._size

    def shed_total(self, reason: str | None = None) -> int:
        """Messages shed so far (of one reason, or all)."""
        with self._cond:
            return sum(n for (r, _), n in self.shed.items() if reason is None or r == reason)

    def put(self, topic: str, item: Item) -> bool:
        """Queue ``item`` received on ``topic``; never blocks. False: it was shed."""
        sender = self._sender_of(topic)
        with self._cond:
            if not self._take_token(sender):
                self._count("rate limit", sender)
                return False
            if self._size >= self.capacity:
                victim = max(self._queues, key=lambda s: len(self._queues[s]))
                if victim != sender and len(self._queues[victim]) <= len(self._queues.get(sender, ())):
                    victim = sender
                if victim in self._queues:
                    self._queues[victim].popleft()
                    self._size -= 1
                    if not self._queues[victim]:
                        del self._queues[victim]
                    self._count("inbox full", victim)
            self._queues.setdefault(sender, deque()).append((topic, item))
            self._size += 1
            self._cond.notify()
            return True

    def get(self, timeout_s: float | None = None) -> Item | None:
        """The next item (senders served round-robin), or None after ``timeout_s``."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._size > 0, timeout_s):
                return None
            sender, queue = next(iter(self._queues.items()))
            _, item = queue.popleft()
            self._size -= 1
            del self._queues[sender]
            if queue:  # to the back of the round
                self._queues[sender] = queue
            return item

    # ------------------------------------------------------------------ internals
    def _take_token(self, sender: str) -> bool:
        if self.rate_per_s is None:
            return True
        now = self._clock()
        tokens, last = self._buckets.get(sender, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate_per_s)
        if tokens < 1.0:
            self._buckets[sender] = (tokens, now)
            return False
        self._buckets[sender] = (tokens - 1.0, now)
        if len(self._buckets) > 4 * self.capacity:  # forget idle senders (full buckets carry no state)
            self._buckets = {s: b for s, b in self._buckets.items() if b[0] < self.burst}
        return True

    def _count(self, reason: str, sender: str) -> None:
        self.shed[reason, sender] += 1
        self._unlogged[reason, sender] += 1
        now = self._clock()
        if now - self._last_log >= self._log_interval_s:
            summary = ", ".join(f"{n} from {s} ({r})" for (r, s), n in self._unlogged.most_common(5))
            logger.warning("inbound overload: shed %d message(s): %s", sum(self._unlogged.values()), summary)
            self._unlogged.clear()
            self._last_log = now


__all__ = ["Inbox", "sender_of_topic"]
