"""Under gevent workers, password hashes run in gevent's threadpool (real OS threads): the event loop
keeps serving other greenlets while they are computed."""
import subprocess
import sys
from pathlib import Path

GEVENT_SCRIPT = r"""
from gevent import monkey
monkey.patch_all()
import threading, time
import gevent
from werkzeug.security import generate_password_hash
from webapp.auth import hashing
stored = generate_password_hash("pw")
ticks = []
def ticker():  # the event loop must keep running while hashes are computed
    for _ in range(40):
        ticks.append(time.monotonic()); gevent.sleep(0.01)
def check(n):
    return hashing.check(stored, "pw" if n % 2 else "nope")
started = time.monotonic()
tick = gevent.spawn(ticker)
results = [g.get() for g in [gevent.spawn(check, n) for n in range(8)]]
tick.join()
gaps = [b - a for a, b in zip(ticks, ticks[1:])]
print(results.count(True), results.count(False), round(max(gaps), 3), hashing._under_gevent())
"""


def test_under_gevent_hashes_run_in_real_threads_and_the_loop_keeps_turning():
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", GEVENT_SCRIPT], cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    right, wrong, longest_gap, under_gevent = out.stdout.split()
    assert (right, wrong, under_gevent) == ("4", "4", "True")
    assert float(longest_gap) < 0.5  # a hash is ~0.1 s of CPU: inline, 8 of them would stall the loop
