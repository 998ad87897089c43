"""Stopping a training loop at a step boundary on Ctrl-C (SIGINT) or SIGTERM.

A first signal asks the loop to save and stop at the next step boundary (so the
checkpoint never holds a half-applied optimizer step); a second one interrupts at
once, and then nothing is saved: it may land between the optimizer's update and
the step counter, or inside the update. SIGTERM is what schedulers, ``timeout``,
``docker stop`` and ``kill`` send: it had ended a run without a checkpoint, losing
every step since the last ``--save-every``.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_label(signum: int) -> str:
    """"Ctrl-C" for SIGINT, else the signal's name ("SIGTERM")."""
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class Interrupted(KeyboardInterrupt):
    """Training stopped by a signal; ``signum`` says which (SIGINT for Ctrl-C).

    A KeyboardInterrupt, so code that stops on Ctrl-C stops on SIGTERM alike."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal_label(signum))
        self.signum = signum


class StopAtBoundary(Interrupted):
    """The loop stopping at a step boundary after a first signal: the state is whole (and
    saved, once ``Trainer.fit`` raises it; under --nproc, by every rank at the same step)."""


def signum_of(e: BaseException) -> int:
    """The signal behind a KeyboardInterrupt: ``Interrupted.signum``, else SIGINT."""
    return int(getattr(e, "signum", signal.SIGINT))


def exit_status(e: BaseException) -> int:
    """The shell's convention, 128 + the signal's number: 130 for Ctrl-C (any
    KeyboardInterrupt), 143 for SIGTERM, so a scheduler can tell a run it stopped
    from one a user interrupted (and neither from a finished one, 0)."""
    return 128 + signum_of(e)


class InterruptFlag:
    """``requested`` once a first SIGINT or SIGTERM arrived (``signum`` says which); a
    second raises ``Interrupted`` where the program is. Installed in the main thread
    only (Python delivers signals there; ``signal.signal`` refuses other threads), and
    not over a signal that is ignored (``nohup``, or SIGINT of a background job), which
    stays ignored; the previous handlers come back on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> InterruptFlag:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, previous in self.previous.items():
            # None: a handler not set from Python, which cannot be put back; the default
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self.previous = {}
