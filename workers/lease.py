"""A job's (or an evaluation's) lease while a worker runs it: renewed from a thread, and `lost` once another
worker owns it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from app.db.session import session_scope
from app.services import jobs

log = logging.getLogger("adaptery.worker")


class Lease:
    """Keeps renewing a job's lease from a thread; `lost` is set when another worker has taken over.

    The training loop reads `lost` every step: it is an in-memory event, so that check costs no query.
    """

    def __init__(self, job_id: str, owner: str, seconds: float, renew: Callable[..., bool] = jobs.renew_lease):
        """`renew(session, id, owner=, lease_seconds=)` extends the lease (default: a job's)."""
        self.job_id, self.owner, self.seconds, self.renew = job_id, owner, seconds, renew
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="adaptery-lease")

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._done.wait(self.seconds / 3):
            try:
                with session_scope() as session:
                    if not self.renew(session, self.job_id, owner=self.owner, lease_seconds=self.seconds):
                        self.lost.set()
                        return
            except Exception:  # keep trying until the lease runs out; expiry is the real arbiter
                log.exception("lease renewal failed")
