"""No fork while a thread of this process is doing database work: the guard that keeps forked children unlocked.

A forked child inherits every lock of its parent as it was at that instant, held ones included, but none of the
threads that would release them. SQLite guards its memory allocator with one process-wide mutex, so when the Celery
worker's main process forks a new training process while its heartbeat, reaper or webhook threads are inside SQLite,
the child's first connection can wait on that mutex forever: the training process never takes a job, and every job
sent to it stays queued (seen in CI after a training process died; beside a thread using SQLite in a loop, 30 of
100 forks hung this way). PostgreSQL's driver and SQLAlchemy's pool hold locks of their own too.

Threads mark their database work with `database_work()`. A fork (`os.register_at_fork`) waits until no thread is
inside such a block and keeps new ones out until it is done, so a child never starts with a database lock held.
The wait is bounded (FORK_WAIT_SECONDS): a block that runs longer only delays the fork, with a warning, and never
stops the parent from replacing a lost training process.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("adaptery.fork_guard")
FORK_WAIT_SECONDS = 30.0


class ForkGuard:
    """Counts the threads inside database work; a fork waits for zero and holds new work back meanwhile."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._condition = threading.Condition()
        self._working = 0
        self._forking = False

    @contextmanager
    def database_work(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._forking, timeout=FORK_WAIT_SECONDS)
            self._working += 1
        try:
            yield
        finally:
            with self._condition:
                self._working -= 1
                self._condition.notify_all()

    def before_fork(self) -> None:
        with self._condition:
            self._forking = True
            if not self._condition.wait_for(lambda: self._working == 0, timeout=FORK_WAIT_SECONDS):
                log.warning("forking after %.0f s with %d thread(s) still doing database work",
                            FORK_WAIT_SECONDS, self._working)

    def after_fork_in_parent(self) -> None:
        with self._condition:
            self._forking = False
            self._condition.notify_all()

    def after_fork_in_child(self) -> None:
        # The child has only the forking thread: nobody else is inside, and the condition's lock may have been
        # taken by a thread that no longer exists here.
        self._reset()


guard = ForkGuard()
os.register_at_fork(before=guard.before_fork, after_in_parent=guard.after_fork_in_parent,
                    after_in_child=guard.after_fork_in_child)
database_work = guard.database_work
