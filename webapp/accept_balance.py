"""Least-connections accept for gunicorn's gevent workers (loaded by webapp/gunicorn_conf.py).

All workers wait on one listening socket, and whichever event loop wakes first takes the connection.
Keep-alive clients (a load balancer, a proxy, wrk's 16 connections) open their connections once, so
an unlucky burst can give one worker all of them for good while the other idles: at 16 clients the
bench saw [16, 0] in 2 of 5 starts, 174-230 turns/s against ~300 when split.

nginx answers this with `accept_disabled`; this is the same idea for gunicorn. The master lends each
worker a slot in a small shared-memory board; a worker writes its open connection count there. A
worker holding more connections than the least loaded ready worker leaves a waiting connection in
the kernel's queue for a millisecond, so the other takes it. The wait is bounded (MAX_WAIT per
connection): a worker whose loop is busy does not hold up the queue, it only loses its turn.

Imports only gevent and gunicorn (never the app): the master loads this module, before any worker
has monkey-patched anything.
"""
import mmap
import os
import time

from gevent.server import StreamServer
from gunicorn.workers import ggevent

SLOTS = 64                  # workers that can take part at once (a worker beyond that just accepts)
WAIT_STEP = 0.001           # a deferred accept looks again after this
MAX_WAIT = 0.010            # ...and takes the connection anyway once it has waited this long


class Board:
    """Per-worker (pid, open connections), in memory shared by the master and its forked workers.
    Each slot has one writer (its worker; the master only while the worker is not running)."""

    def __init__(self, slots=SLOTS):
        self._memory = mmap.mmap(-1, slots * 8)      # anonymous and shared: survives fork
        self._cells = memoryview(self._memory).cast("i")
        self.slots = slots

    def claim(self, taken):
        """Master, before a fork: a free slot (none in `taken`), emptied; None if all are taken."""
        for slot in range(self.slots):
            if slot not in taken:
                self.clear(slot)
                return slot
        return None

    def clear(self, slot):
        self._cells[2 * slot] = 0
        self._cells[2 * slot + 1] = 0

    def ready(self, slot, pid):
        self._cells[2 * slot + 1] = 0
        self._cells[2 * slot] = pid

    def add(self, slot, change):
        self._cells[2 * slot + 1] += change

    def count(self, slot):
        return self._cells[2 * slot + 1]

    def least_other(self, slot):
        """Fewest connections held by another ready worker (None when there is none)."""
        cells = self._cells
        counts = [cells[2 * other + 1] for other in range(self.slots) if other != slot and cells[2 * other]]
        return min(counts, default=None)


BOARD = Board()


class Deferral:
    """Whether a worker should leave the next connection to a less loaded one, and for how long."""

    def __init__(self, board, slot, clock=time.monotonic):
        self.board, self.slot, self.clock = board, slot, clock
        self.since = None       # when the current connection was first left waiting

    def should_wait(self):
        least = self.board.least_other(self.slot)
        if least is None or self.board.count(self.slot) <= least:
            self.since = None
            return False
        now = self.clock()
        if self.since is None:
            self.since = now
        if now - self.since < MAX_WAIT:
            return True
        self.since = None       # waited long enough: take it, and give the next one a fresh wait
        return False


class BalancedServer(StreamServer):
    """gevent's StreamServer that keeps the board's count and defers accepts when loaded."""

    deferral = None             # set by the worker; None = accept like gevent does

    def _do_read(self):
        if self.deferral is not None and self.deferral.should_wait():
            self.stop_accepting()
            self._timer = self.loop.timer(WAIT_STEP)
            self._timer.start(self._start_accepting_if_started)
            return
        super()._do_read()

    def do_handle(self, *args):
        if self.deferral is not None:
            self.deferral.board.add(self.deferral.slot, 1)
        super().do_handle(*args)

    def do_close(self, *args):
        if self.deferral is not None:
            self.deferral.board.add(self.deferral.slot, -1)
        super().do_close(*args)


class BalancedGeventWorker(ggevent.GeventWorker):
    """gunicorn's gevent worker, serving through BalancedServer."""

    balance_slot = None         # given by the master in pre_fork

    def run(self):
        # GeventWorker.run builds its servers from the module's StreamServer name; this process
        # runs only this worker, so pointing that name at BalancedServer changes nothing else.
        if self.balance_slot is not None:
            BalancedServer.deferral = Deferral(BOARD, self.balance_slot)
            BOARD.ready(self.balance_slot, os.getpid())
        ggevent.StreamServer = BalancedServer
        super().run()

    def handle_exit(self, sig, frame):
        # Leaving (SIGTERM): it accepts nothing more, so the others must stop leaving it connections.
        release_slot(self)
        super().handle_exit(sig, frame)


def assign_slot(arbiter, worker):
    """pre_fork hook (master): lend the new worker a free slot."""
    taken = {getattr(other, "balance_slot", None) for other in arbiter.WORKERS.values()}
    worker.balance_slot = BOARD.claim(taken)


def release_slot(worker):
    """child_exit / worker_exit hook: the worker is gone (or going), others stop waiting for it."""
    if getattr(worker, "balance_slot", None) is not None:
        BOARD.clear(worker.balance_slot)
