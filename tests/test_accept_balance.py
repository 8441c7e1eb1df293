"""The least-connections accept board and rule (webapp/accept_balance.py); the split itself is
tested against gunicorn in test_capacity.py."""
from types import SimpleNamespace

from webapp.accept_balance import MAX_WAIT, Board, Deferral, assign_slot, release_slot


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def two_workers():
    board = Board(slots=4)
    board.ready(0, 1001)
    board.ready(1, 1002)
    return board


def test_a_worker_holding_more_than_another_waits_and_the_wait_is_bounded():
    board, clock = two_workers(), Clock()
    deferral = Deferral(board, 0, clock)
    assert not deferral.should_wait()           # 0 against 0: take it
    board.add(0, 1)
    assert deferral.should_wait()               # 1 against 0: leave it to worker 1
    clock.now += MAX_WAIT / 2
    assert deferral.should_wait()
    clock.now += MAX_WAIT                       # worker 1 did not take it in time: take it anyway
    assert not deferral.should_wait()
    assert deferral.should_wait()               # the next connection gets a fresh wait
    board.add(1, 1)
    assert not deferral.should_wait()           # 1 against 1


def test_only_ready_workers_count_and_a_released_slot_stops_the_waiting():
    board = Board(slots=4)
    board.ready(0, 1001)
    board.add(0, 5)
    deferral = Deferral(board, 0, Clock())
    assert not deferral.should_wait()           # alone: nobody to leave it to
    board.ready(1, 1002)
    assert deferral.should_wait()
    board.clear(1)                              # worker 1 left
    assert not deferral.should_wait()


def test_the_master_lends_each_worker_a_free_slot_and_takes_it_back(monkeypatch):
    import webapp.accept_balance as balance
    board = Board(slots=2)
    monkeypatch.setattr(balance, "BOARD", board)
    first, second, third = (SimpleNamespace() for _ in range(3))
    arbiter = SimpleNamespace(WORKERS={})
    assign_slot(arbiter, first)
    arbiter.WORKERS[1] = first
    assign_slot(arbiter, second)
    arbiter.WORKERS[2] = second
    assert (first.balance_slot, second.balance_slot) == (0, 1)
    assign_slot(arbiter, third)
    assert third.balance_slot is None           # no slot left: it accepts like plain gevent
    board.ready(0, 1001)
    board.add(0, 3)
    release_slot(first)                         # it died: its slot is free and empty
    assert board.least_other(1) is None and board.count(0) == 0
    del arbiter.WORKERS[1]
    assign_slot(arbiter, third)
    assert third.balance_slot == 0
