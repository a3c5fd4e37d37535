"""The two ways a command stops early on purpose: bad input (exit 2) and a signal (exit 128 + signal)."""
from __future__ import annotations

import signal


class UsageError(Exception):
    """Bad input found before any long work starts: printed as one line, exit code 2."""


class Interrupted(Exception):
    """SIGTERM (or SIGINT) reached the driver: stop, keep every finished cell, exit 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.code = 128 + signum
