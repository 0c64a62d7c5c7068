"""The peak resident memory of this process, the one figure biofed reports as a process's peak."""

from __future__ import annotations

import resource
import sys

__all__ = ["peak_rss_mb"]


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB: Linux's ``VmHWM``.

    Not ``ru_maxrss``: Linux carries the parent's peak over ``fork`` and ``exec`` into the child's
    ``ru_maxrss``, so a process started by a larger one (a benchmark's child, an agent started by
    a test runner) would report its parent's peak. ``VmHWM`` belongs to the process's own
    address space. Where ``/proc`` is absent, ``ru_maxrss`` (KiB on Linux, bytes on macOS) is the
    closest figure.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0
