"""Idempotent handlers: QoS 1 may deliver a message twice."""

from __future__ import annotations

import threading
from collections import OrderedDict


class SeenMessageIds:
    """Bounded LRU set of message ids, so QoS 1 redeliveries are processed once.

    Thread-safe. ``add`` returns True the first time an id is seen, False for duplicates.
    The oldest ids are forgotten beyond ``capacity``; size it above the number of
    messages that can be in flight between a publish and its redelivery.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, message_id: str) -> bool:
        with self._lock:
            if message_id in self._ids:
                self._ids.move_to_end(message_id)
                return False
            self._ids[message_id] = None
            if len(self._ids) > self.capacity:
                self._ids.popitem(last=False)
            return True

    def __contains__(self, message_id: object) -> bool:
        with self._lock:
            return message_id in self._ids

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids)


__all__ = ["SeenMessageIds"]
