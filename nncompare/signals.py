"""The driver's signal handling: SIGTERM stops a command like Ctrl-C does, and nothing cuts a results write short."""
from __future__ import annotations

import signal
from contextlib import contextmanager

from .errors import Interrupted


@contextmanager
def interruptible():
    """SIGTERM raises Interrupted like Ctrl-C raises KeyboardInterrupt, so cleanup runs either way."""
    def handler(signum, frame):
        raise Interrupted(signum)
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextmanager
def uninterruptible():
    """Hold SIGINT/SIGTERM while the results are written: a second Ctrl-C must not cut the write short."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
