"""SIGTERM and SIGINT as exceptions: a command stopped by a scheduler or Ctrl-C ends cleanly.

SLURM and Kubernetes send SIGTERM before they kill a job, and a person presses Ctrl-C. Left to
Python and Lightning, SIGTERM ends a run at the next batch with exit status 0 (Lightning's
``SIGTERMException`` is a ``SystemExit`` without a code), so a preempted job looks successful.
Inside :func:`stop_on_signals` both signals raise :class:`Interrupted` wherever the main thread is;
each layer cleans up what it owns on the way out (a run keeps its last completed epoch, a study
queues its running cells again) and the command line exits with ``128 + signal`` as shells do
(143 for SIGTERM, 130 for SIGINT).

Lightning's Trainer installs its own SIGTERM handler while it runs and calls the one it found
(this one) after its own, so the signal reaches the package inside a run too.
"""

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["Interrupted", "stop_on_signals"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A command was stopped by a signal: a stop, not an error.

    A ``BaseException``, like ``KeyboardInterrupt``: no ``except Exception`` swallows it, and
    Lightning's loop tears down and re-raises it as it is (a ``KeyboardInterrupt`` it would turn
    into ``sys.exit(1)``).

    Args:
        signum: The signal received.
        kept: What the command kept and how to continue (filled in by the layer that knows).
    """

    def __init__(self, signum: int, kept: str = "") -> None:
        super().__init__(signum, kept)
        self.signum, self.kept = signum, kept

    @property
    def name(self) -> str:
        """``SIGTERM`` or ``SIGINT``."""
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        """``128 + signal``, what a shell reports for a command a signal ended."""
        return 128 + self.signum

    def __str__(self) -> str:
        return f"stopped by {self.name}" + (f": {self.kept}" if self.kept else "")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Raise :class:`Interrupted` on the first SIGTERM or SIGINT in this block; ignore any further one.

    A second Ctrl-C while the first is being cleaned up (checkpoints closed, cells queued again)
    would cut the clean-up short and leave the half-made state the first one is there to avoid.
    Outside the main thread (a notebook's worker thread, a server) signals cannot be caught and
    nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if received:
            return
        received.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
