"""A process that forks while its threads use SQLite: the child must never start with SQLite's mutex held
(app/db/fork_guard.py). Without the guard, about a third of these forks hang in the child's first connection."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from app.db.fork_guard import database_work, guard

FORKS = 40


def sqlite_work() -> None:
    connection = sqlite3.connect(":memory:")
    connection.execute("CREATE TABLE t (x)")
    connection.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(50)])
    connection.close()


@pytest.fixture()
def busy_thread() -> Iterator[Callable[[Callable[[], None]], None]]:
    """Starts a thread that runs the given loop body until the test ends."""
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def start(body: Callable[[], None]) -> None:
        def loop() -> None:
            while not stop.is_set():
                body()

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        threads.append(thread)

    yield start
    stop.set()
    for thread in threads:
        thread.join(timeout=10)


def hung_forks(count: int) -> int:
    """Fork `count` times; each child opens an SQLite connection and exits. How many children were still
    stuck after 5 s (killed then)."""
    hung = 0
    for _ in range(count):
        pid = os.fork()
        if pid == 0:  # the child: never back into pytest
            try:
                sqlite3.connect(":memory:").execute("SELECT 1")
            finally:
                os._exit(0)
        deadline = time.monotonic() + 5
        while os.waitpid(pid, os.WNOHANG)[0] == 0:
            if time.monotonic() >= deadline:
                hung += 1
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                break
            time.sleep(0.002)
    return hung


def test_a_fork_never_hands_its_child_a_held_sqlite_lock(busy_thread: Callable[..., None]) -> None:
    busy_thread(lambda: _in_database_work(sqlite_work))
    time.sleep(0.05)
    assert hung_forks(FORKS) == 0


def _in_database_work(action: Callable[[], None]) -> None:
    with database_work():
        action()


def test_the_worker_threads_do_their_work_inside_the_guard() -> None:
    """The worker's heartbeat, reaper, queue and webhook timers run their actions as database work."""
    from workers import process

    seen: list[int] = []
    done = threading.Event()

    def action() -> None:
        seen.append(guard._working)
        done.set()

    process._every(60, action, "adaptery-test-timer")
    try:
        assert done.wait(10)
    finally:
        process._stop_threads.set()
        for thread in threading.enumerate():
            if thread.name == "adaptery-test-timer":
                thread.join(10)
        process._stop_threads.clear()
    assert seen and seen[0] >= 1


def test_new_work_waits_for_a_fork_and_a_long_block_only_delays_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.db import fork_guard

    monkeypatch.setattr(fork_guard, "FORK_WAIT_SECONDS", 0.2)
    entered = threading.Event()
    release = threading.Event()

    def long_block() -> None:
        with database_work():
            entered.set()
            release.wait(10)

    holder = threading.Thread(target=long_block)
    holder.start()
    assert entered.wait(5)
    started = time.monotonic()
    pid = os.fork()  # waits the (shortened) bound for the block, then forks anyway
    if pid == 0:
        os._exit(0)
    waited = time.monotonic() - started
    os.waitpid(pid, 0)
    release.set()
    holder.join(5)
    assert 0.15 <= waited < 5
    with database_work():  # the guard is open again after the fork
        pass
