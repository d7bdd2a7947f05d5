"""Stops that lose nothing: SIGINT (Ctrl-C), SIGTERM (what a cluster sends before it preempts a
job) and SIGUSR1 (what schedulers such as Slurm can be asked to send ahead of a time limit) let the
current optimizer step finish; the trainer then writes a checkpoint and raises
:class:`TrainingStopped` naming it. A second signal stops at once (``KeyboardInterrupt``)."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Optional

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


class TrainingStopped(Exception):
    """A signal stopped the run after a whole step; ``checkpoint`` is where it continues from."""

    def __init__(self, signal_name: str, step: int, checkpoint):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        super().__init__(
            f"{signal_name}: stopped after step {step}; checkpoint {checkpoint} written (--resume continues from it)"
        )

    @property
    def exit_code(self) -> int:
        return 128 + int(getattr(signal, self.signal_name, signal.SIGINT))


class StopRequests:
    """Records the first stop signal; a second one interrupts at once."""

    def __init__(self):
        self.received: Optional[str] = None

    def handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(f"a second {signal.Signals(signum).name}: stopping at once")
        self.received = signal.Signals(signum).name


@contextlib.contextmanager
def stop_requests():
    """Within the block, the stop signals are recorded in the yielded :class:`StopRequests`
    instead of ending the process (only in the main thread, where Python delivers signals); the
    previous handlers come back afterwards."""
    requests = StopRequests()
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return
    previous = {sig: signal.signal(sig, requests.handle) for sig in SIGNALS}
    try:
        yield requests
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
