"""Graceful stop on preemption: checkpoint at the next step boundary, then exit.

Protocol of ``jtl train`` (see ``jtl.pretrain``):

* The first SIGTERM (or SIGINT / Ctrl-C) only sets a flag. At the next step
  boundary the loop saves a checkpoint of that step, waits until it is committed
  and exits with code **75** (``EXIT_PREEMPTED``, EX_TEMPFAIL: "try again") after
  printing ``jtl: preempted at step N; checkpoint committed in DIR``. Running the
  same command again resumes from that step exactly.
* A second SIGTERM/SIGINT before that exits at once (exit status 143 for SIGTERM,
  130 for SIGINT), even while the main thread is inside a long native call such as
  the first step's compilation (see ``Guard``). The last committed checkpoint stays
  restorable, as after a SIGKILL.
* Multi-process runs (``jax.distributed`` initialized): JAX's preemption notifier
  owns SIGTERM and all processes agree on the stop step through
  ``multihost_utils.reached_preemption_sync_point``; a process-local flag would let
  hosts stop at different steps and deadlock the rest.

A launcher can therefore loop: ``until jtl train CFG; [ $? -ne 75 ] && break; done``.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

import jax

log = logging.getLogger("jtl")

EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _ignore(signum, frame):  # a Python handler must be set for the wakeup fd to be written
    pass


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
    """Context manager: ``guard.stop_requested(step)`` at each step boundary.

    Python runs signal handlers only between bytecodes, so while the main thread is in
    a long native call (XLA compiling the first step, a big host transfer) a handler
    would wait, and a second signal would merge into the first. The C-level handler
    writes every signal to a wakeup pipe at once (``signal.set_wakeup_fd``); a watcher
    thread reads it: the first signal sets the stop flag, the second exits at once.

    Guards nest: inside an active guard, ``with Guard() as g`` gives the outer one. ``jtl
    train`` holds one for the whole command, so a signal that arrives before the loop
    (while the model is restored or the data is read) is kept for the first step boundary
    instead of killing the process with the default handler."""

    _active: "Guard | None" = None

    def __init__(self):
        self._flag = threading.Event()
        self._previous = {}
        self._wakeup = None
        self._nested = False
        self.signal_name = None
        self.received = 0

    def __enter__(self):
        if Guard._active is not None:
            self._nested = True
            return Guard._active
        Guard._active = self
        if not _distributed() and threading.current_thread() is threading.main_thread():
            r, w = os.pipe()
            os.set_blocking(w, False)
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, _ignore)  # the watcher does the work
            self._wakeup = (r, w, signal.set_wakeup_fd(w, warn_on_full_buffer=False))
            threading.Thread(target=self._watch, args=(r,), name="jtl-preemption", daemon=True).start()
        return self

    def __exit__(self, *exc):
        if self._nested:
            self._nested = False
            return False
        Guard._active = None
        if self._wakeup is not None:
            r, w, old = self._wakeup
            signal.set_wakeup_fd(old)
            os.close(w)  # the watcher reads EOF and ends
            self._wakeup = None
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous.clear()
        return False

    def _watch(self, r: int) -> None:
        try:
            while True:
                data = os.read(r, 16)
                if not data:
                    return
                for signum in data:
                    if signum in SIGNALS:
                        self._handle(signum, None)
        except OSError:
            return
        finally:
            os.close(r)

    def _handle(self, signum, frame):
        self.received += 1
        name = signal.Signals(signum).name
        if self.received > 1:  # the second signal: exit now, the last committed step stays intact
            os.write(2, f"jtl: second {name}: exiting at once (the last committed checkpoint is "
                        f"intact)\n".encode())
            os._exit(128 + signum)
        self.signal_name = name
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
