"""One network thread for many MQTT connections (paho's external-loop API over a selector).

paho's own ``loop_start`` gives every client a thread that waits in ``select()``, which
fails for file descriptors >= 1024 (``FD_SETSIZE``); each paho client holds three (its
socket and a wake-up socket pair), so a process cannot host more than about 300 clients
that way. :class:`NetworkLoop` serves any number of :class:`biofed.mqtt.MqttClient` s from
one thread with :mod:`selectors` (epoll on Linux): it reads when a socket is readable,
writes when paho has queued packets, runs paho's keep-alive bookkeeping once a second and
reconnects dropped clients with their own capped, jittered exponential backoff.

A process hosting thousands of connections also needs the file descriptors:
:func:`ensure_open_files` raises ``RLIMIT_NOFILE`` (the hard limit too, where the process
may: root, up to the kernel's ``fs.nr_open``) or says exactly why it cannot.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import queue
import resource
import selectors
import socket
import threading
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["FileLimitError", "NetworkLoop", "ensure_open_files"]

_MISC_INTERVAL_S = 1.0
_NR_OPEN = Path("/proc/sys/fs/nr_open")
_CAP_SYS_RESOURCE = 24  # bit of the capability in /proc/self/status CapEff (linux/capability.h)


def _why_not(needed: int, raise_hard: bool) -> str:
    """Why the hard open-file limit cannot go to ``needed``: the kernel's maximum or the capability."""
    try:
        nr_open = int(_NR_OPEN.read_text())
    except (OSError, ValueError):
        nr_open = None
    if nr_open is not None and needed > nr_open:
        return f"the kernel allows at most fs.nr_open = {nr_open} per process"
    if not raise_hard:
        return "the hard limit allows it, yet the kernel refused"
    try:
        status = Path("/proc/self/status").read_text()
        effective = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)
    except (OSError, ValueError, StopIteration):
        return "raising the hard limit needs CAP_SYS_RESOURCE"
    if not effective >> _CAP_SYS_RESOURCE & 1:
        return (
            f"raising the hard limit needs CAP_SYS_RESOURCE, which this process lacks (uid {os.geteuid()}; "
            "containers often drop it even for root)"
        )
    return "raising the hard limit needs CAP_SYS_RESOURCE"


class FileLimitError(RuntimeError):
    """This process cannot get the open-file limit it needs (the message says why and what to do)."""


def ensure_open_files(needed: int, purpose: str = "this process") -> int:
    """Make sure this process (and the children it starts from now on, which inherit the
    limit) may open ``needed`` file descriptors; returns the soft ``RLIMIT_NOFILE`` in force.

    The soft limit is raised to ``needed`` when the hard limit allows it; otherwise both are
    raised, which needs ``CAP_SYS_RESOURCE`` (root) and ``needed <= fs.nr_open``.

    Raises
    ------
    FileLimitError
        The limit cannot be raised that far; the message gives the limits, the reason and
        the fix.
    """
    if isinstance(needed, bool) or not isinstance(needed, int) or needed < 1:
        raise ValueError(f"needed must be an integer >= 1, got {needed!r}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    raise_hard = hard != resource.RLIM_INFINITY and hard < needed
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed if raise_hard else hard))
    except (ValueError, OSError) as exc:
        raise FileLimitError(
            f"{purpose} needs {needed} open files, but its limit is {soft} (hard limit {hard}) and raising it "
            f"failed: {exc} ({_why_not(needed, raise_hard)}). Raise it before starting (`ulimit -Hn {needed}; "
            f"ulimit -n {needed}` with CAP_SYS_RESOURCE, or LimitNOFILE= in a systemd unit)."
        ) from None
    logger.info("open-file limit raised from %d to %d for %s", soft, needed, purpose)
    return needed


class NetworkLoop:
    """A daemon thread driving the sockets of every attached paho client.

    paho calls the socket callbacks installed by :meth:`prepare` from any thread; they only
    queue a command and wake the loop, so the selector is touched by the loop thread alone.
    """

    def __init__(self, name: str = "mqtt-network") -> None:
        self._selector = selectors.DefaultSelector()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._fds: dict[Any, int] = {}  # paho client -> registered fd
        self._owners: dict[Any, Any] = {}  # paho client -> MqttClient
        self._reconnects: list[tuple[float, int, Any]] = []
        self._sequence = itertools.count()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ called by MqttClient
    def prepare(self, client, owner) -> None:
        """Install the socket callbacks on paho ``client`` (before its ``connect``)."""
        self._owners[client] = owner
        client.on_socket_open = lambda c, userdata, sock: self._command("open", c, sock)
        client.on_socket_close = lambda c, userdata, sock: self._command("close", c, sock)
        client.on_socket_register_write = lambda c, userdata, sock: self._command("write", c, True)
        client.on_socket_unregister_write = lambda c, userdata, sock: self._command("write", c, False)

    def forget(self, client) -> None:
        """Stop serving ``client`` once its socket is closed (after ``disconnect``)."""
        self._command("forget", client, None)

    def reconnect_later(self, owner, delay_s: float) -> None:
        """Call ``owner._reconnect()`` from the loop thread in ``delay_s`` seconds."""
        self._command("reconnect", owner, time.monotonic() + delay_s)

    def stop(self) -> None:
        self._stopped.set()
        self._wake()
        self._thread.join(timeout=5.0)

    # ------------------------------------------------------------------ loop thread
    def _command(self, kind: str, target, argument) -> None:
        self._commands.put((kind, target, argument))
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake, or stopping

    def _apply(self, kind: str, client, argument) -> None:
        if kind == "open":
            self._unregister(client)
            fd = argument.fileno()
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
            self._selector.register(fd, events, client)
            self._fds[client] = fd
        elif kind == "close":
            self._unregister(client)
        elif kind == "write":
            fd = self._fds.get(client)
            if fd is not None:
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if argument else 0)
                try:
                    self._selector.modify(fd, events, client)
                except (KeyError, ValueError, OSError):
                    pass  # closed meanwhile
        elif kind == "forget":
            if client.want_write():  # the DISCONNECT: paho closes the socket once it is written
                try:
                    client.loop_write()
                except Exception:  # noqa: BLE001 - the socket is going anyway
                    logger.debug("network loop: flushing a closing client failed", exc_info=True)
            self._unregister(client)
            self._owners.pop(client, None)
        elif kind == "reconnect":
            heapq.heappush(self._reconnects, (argument, next(self._sequence), client))

    def _unregister(self, client) -> None:
        fd = self._fds.pop(client, None)
        if fd is not None:
            try:
                self._selector.unregister(fd)
            except (KeyError, ValueError, OSError):
                pass

    def _run(self) -> None:
        next_misc = time.monotonic() + _MISC_INTERVAL_S
        while not self._stopped.is_set():
            now = time.monotonic()
            due = min(next_misc, self._reconnects[0][0] if self._reconnects else next_misc)
            try:
                events = self._selector.select(max(due - now, 0.0))
            except OSError as exc:
                logger.error("network loop: select failed: %s", exc)
                events = []
            for key, mask in events:
                client = key.data
                if client is None:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                    continue
                try:
                    if mask & selectors.EVENT_READ:
                        client.loop_read()
                    if mask & selectors.EVENT_WRITE and self._fds.get(client) == key.fd:
                        client.loop_write()
                except Exception:  # noqa: BLE001 - one client's failure must not stop the others
                    logger.exception("network loop: a client's socket handling failed")
            while True:
                try:
                    self._apply(*self._commands.get_nowait())
                except queue.Empty:
                    break
            now = time.monotonic()
            if now >= next_misc:
                next_misc = now + _MISC_INTERVAL_S
                for client in list(self._fds):
                    client.loop_misc()
            while self._reconnects and self._reconnects[0][0] <= now:
                _, _, owner = heapq.heappop(self._reconnects)
                try:
                    owner._reconnect()
                except Exception:  # noqa: BLE001 - rescheduled by the owner, never fatal here
                    logger.exception("network loop: reconnect failed")
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
