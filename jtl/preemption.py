"""Graceful stop on preemption: checkpoint at the next step boundary, then exit.

Protocol of ``jtl train`` (see ``jtl.pretrain``):

* The first SIGTERM (or SIGINT / Ctrl-C) only sets a flag. At the next step
  boundary the loop saves a checkpoint of that step, waits until it is committed
  and exits with code **75** (``EXIT_PREEMPTED``, EX_TEMPFAIL: "try again") after
  printing ``jtl: preempted at step N; checkpoint committed in DIR``. Running the
  same command again resumes from that step exactly.
* A second SIGTERM/SIGINT before that exits promptly: the handler restores the
  default action after the first signal, so the second one kills the process at
  once (exit status 143 for SIGTERM, 130 for SIGINT). The last committed
  checkpoint stays restorable, as after a SIGKILL.
* Multi-process runs (``jax.distributed`` initialized): JAX's preemption notifier
  owns SIGTERM and all processes agree on the stop step through
  ``multihost_utils.reached_preemption_sync_point``; a process-local flag would let
  hosts stop at different steps and deadlock the rest.

A launcher can therefore loop: ``until jtl train CFG; [ $? -ne 75 ] && break; done``.
"""
from __future__ import annotations

import logging
import signal
import threading

import jax

log = logging.getLogger("jtl")

EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(SystemExit):
    """Raised after the preemption checkpoint committed; exits with EXIT_PREEMPTED when
    uncaught (a SystemExit, so no traceback)."""

    def __init__(self, step: int, where: str):
        super().__init__(EXIT_PREEMPTED)
        self.step, self.where = step, where

    def __str__(self):
        return f"preempted at step {self.step}; checkpoint committed in {self.where}"


def _distributed() -> bool:
    return jax.process_count() > 1


class Guard:
    """Context manager: ``guard.stop_requested(step)`` at each step boundary."""

    def __init__(self):
        self._flag = threading.Event()
        self._previous = {}
        self.signal_name = None

    def __enter__(self):
        if not _distributed() and threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        # Default action from now on: a second signal ends the process immediately,
        # even while the main thread is stuck in a long native call.
        for s in SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        self._flag.set()
        log.warning("%s received: saving a checkpoint at the end of this step, then exiting "
                    "with code %d (send it again to exit at once)", self.signal_name, EXIT_PREEMPTED)

    def request(self) -> None:
        """Ask for a stop at the next step boundary (tests, callbacks)."""
        self.signal_name = self.signal_name or "request"
        self._flag.set()

    def stop_requested(self, step: int) -> bool:
        if _distributed():
            from jax.experimental import multihost_utils
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self._flag.is_set()
