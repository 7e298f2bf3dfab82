"""How a training run stops early: a non-finite loss (Stop) or SIGINT/SIGTERM, which end the step in
progress, write a checkpoint and raise Interrupted. train.main prints either as one line."""
from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator


class Stop(Exception):
    """Training stopped on a non-finite loss or gradient; the message says where the good checkpoint
    is."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped training after a checkpoint; the message says how to continue."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@contextmanager
def stop_signals() -> Iterator[list[int]]:
    """SIGINT and SIGTERM append to the yielded list instead of killing: the loop finishes its step
    first."""
    seen: list[int] = []
    handlers = {s: signal.signal(s, lambda signum, frame: seen.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield seen
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
