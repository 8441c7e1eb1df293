"""generation.Live: how followers in this process learn of a running answer's news."""
import threading
import time

from webapp.generation import Live

TIMEOUT = 10.0  # far longer than any wake-up: a follower that returns early was woken, not timed out


def follower(live, seen, woke):
    news = threading.Event()
    started = time.monotonic()
    live.wait(seen, TIMEOUT, news)
    woke.append(time.monotonic() - started)


def waiting(live, count, seen=0):
    """`count` followers blocked in live.wait; returns their threads and the list their wake-ups fill."""
    woke = []
    threads = [threading.Thread(target=follower, args=(live, seen, woke)) for _ in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + TIMEOUT
    while len(live._followers) < count and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(live._followers) == count
    return threads, woke


def test_every_follower_is_woken_by_a_token_the_end_a_stop_and_a_new_place_in_line():
    for news in (lambda live: live.append("hi"), Live.finish, Live.abort, lambda live: live.place(2)):
        live = Live(1)
        threads, woke = waiting(live, 3)
        news(live)
        for thread in threads:
            thread.join(TIMEOUT)
        assert len(woke) == 3 and max(woke) < TIMEOUT / 2
        assert live._followers == set()  # nobody left registered


def test_news_that_came_before_the_wait_is_not_waited_for():
    live = Live(1)
    live.append("already here")
    news = threading.Event()
    news.set()  # left over from an earlier wait of this follower: cleared, not mistaken for news
    started = time.monotonic()
    live.wait(0, TIMEOUT, news)  # text past 0 is there: returns at once
    assert time.monotonic() - started < TIMEOUT / 2
    live.wait(len(live.text), 0.05, news)  # nothing new: waits out its (short) timeout
    assert not news.is_set()
