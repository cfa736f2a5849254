"""Inference routing for the API role: which inference replica serves a request, and the forwarding itself.

Replicas come from a static list (ADAPTERY_INFERENCE_URLS). Every ADAPTERY_ROUTING_POLL_SECONDS the router
asks each replica's /internal/state whether it is ready, which adapters it holds in memory and how many
requests it is serving. A request for an adapter goes to a replica that already holds it and has room;
else to the adapter's owner by rendezvous hashing (a stable order of the replicas per adapter, which moves
only the adapters of a replica that comes or goes), passing over a replica whose load is above
`load_factor` × the mean (+1): bounded-load consistent hashing (Mirrokni, Thorup and Zadimoghaddam, 2018),
so one hot adapter spills onto a second replica instead of queueing behind the first. A base-model request
goes to the least loaded replica. A replica that fails before its response starts is marked down and the
next one is tried (nothing was streamed yet, so the client sees one answer); once bytes have gone out, a
failure ends the response. Responses stream through unbuffered.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import IO, Any

import httpx
from starlette.requests import Request
from starlette.responses import StreamingResponse

from app import logs
from app.errors import Unavailable

log = logging.getLogger("adaptery")

# What a forwarded request carries over, and what comes back from the replica.
FORWARDED_HEADERS = ("authorization", "content-type", "accept", "x-request-id", "idempotency-key")
RETURNED_HEADERS = ("content-type", "retry-after", "www-authenticate", "cache-control", "x-request-id")
# The header that marks a request as forwarded by an API process (its value: the internal key).
INTERNAL_HEADER = logs.INTERNAL_HEADER
# Answers that mean "this replica cannot take it now": try the next one (nothing has been streamed). Not 504: a
# replica answers it when a generation ran past the generation timeout, and another try would double the wait.
RETRY_STATUSES = frozenset({502, 503})
# An adapter held by several replicas shows its most available state.
STATE_ORDER = {"active": 0, "cpu": 1, "failed": 2}


@dataclass
class Replica:
    index: int
    url: str
    up: bool = False
    # Adapter id → its state there ("active", "cpu", "failed"; pinned ones are listed in `pinned`).
    held: dict[str, str] = field(default_factory=dict)
    pinned: set[str] = field(default_factory=set)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)  # adapter id → last use, load time, rank, error
    gauges: dict[str, dict[str, Any]] = field(default_factory=dict)  # base model → its engine's gauges (metrics.py)
    reported_in_flight: int = 0
    forwarded: int = 0  # requests this API process has open on it right now
    error: str | None = None

    @property
    def load(self) -> int:
        # The replica's own count covers every API process but is up to a poll old; ours is exact for us.
        return max(self.reported_in_flight, self.forwarded)


def _score(key: str, url: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}|{url}".encode(), digest_size=8).digest(), "big")


class InferenceRouter:
    def __init__(self, urls: list[str], *, internal_key: str, policy: str = "affinity", load_factor: float = 1.25,
                 poll_seconds: float = 1.0):
        self.replicas = [Replica(index=i, url=url.rstrip("/")) for i, url in enumerate(urls)]
        self.internal_key = internal_key
        self.policy = policy
        self.load_factor = load_factor
        self.poll_seconds = poll_seconds
        self._turn = 0
        # No overall timeout: a generation streams for as long as it takes; connecting must be quick.
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=3.0))
        self._poller: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ state

    async def start(self) -> None:
        await self.poll_once()
        self._poller = asyncio.create_task(self._poll_forever())

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        await self.client.aclose()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            await self.poll_once()

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._check(replica) for replica in self.replicas))

    async def _check(self, replica: Replica) -> None:
        try:
            answer = await self.client.get(f"{replica.url}/internal/state", timeout=2.0,
                                           headers={"Authorization": f"Bearer {self.internal_key}"})
            state = answer.json()
            replica.up = answer.status_code == 200 and bool(state.get("ready"))
            replica.held = {str(k): str(v) for k, v in state.get("held", {}).items()}
            replica.pinned = set(state.get("pinned", []))
            replica.details = dict(state.get("details", {}))
            replica.gauges = dict(state.get("gauges", {}))
            replica.reported_in_flight = int(state.get("in_flight", 0))
            replica.error = None if replica.up else f"HTTP {answer.status_code}: {answer.text[:200]}"
        except (httpx.HTTPError, ValueError) as exc:
            replica.up = False
            replica.error = f"{type(exc).__name__}: {exc}"

    def residency(self, adapter_id: str) -> dict[str, Any] | None:
        """Where an adapter is across the replicas: its best state and whether any replica pins it."""
        states = [r.held[adapter_id] for r in self.replicas if r.up and adapter_id in r.held]
        if not states:
            return None
        best = min(states, key=lambda state: STATE_ORDER.get(state, len(STATE_ORDER)))
        holder = next(r for r in self.replicas if r.up and r.held.get(adapter_id) == best)
        used = [r.details.get(adapter_id, {}).get("last_used_at") for r in self.replicas if r.up]
        return {**holder.details.get(adapter_id, {}), "state": best,
                "last_used_at": max((u for u in used if u is not None), default=None),
                "pinned": any(adapter_id in r.pinned for r in self.replicas if r.up),
                "replicas": sorted(r.index for r in self.replicas if r.up and adapter_id in r.held)}

    def engine_gauges(self) -> dict[str, dict[str, Any]]:
        """The up replicas' engine gauges, summed per base model (the shape of metrics.engine_gauges)."""
        total: dict[str, dict[str, Any]] = {}
        for replica in self.replicas:
            if not replica.up:
                continue
            for name, values in replica.gauges.items():
                into = total.setdefault(name, {"adapters": {}, "pinned": 0, "in_flight": 0, "busy": 0})
                for state, count in values.get("adapters", {}).items():
                    into["adapters"][state] = into["adapters"].get(state, 0) + int(count)
                for key in ("pinned", "in_flight", "busy"):
                    into[key] += int(values.get(key, 0))
        return total

    def report(self) -> dict[str, Any]:
        up = [r for r in self.replicas if r.up]
        return {"ok": bool(up), "replicas": len(self.replicas), "up": len(up),
                **({"errors": {r.url: r.error for r in self.replicas if not r.up}} if len(up) < len(self.replicas)
                   else {})}

    # ------------------------------------------------------------------ choice

    def candidates(self, adapter_id: str | None) -> list[Replica]:
        """Replicas in the order to try them."""
        up = [r for r in self.replicas if r.up] or list(self.replicas)  # none known up: try them all
        if self.policy == "round_robin":
            self._turn = (self._turn + 1) % len(up)
            return up[self._turn:] + up[:self._turn]
        if adapter_id is None:
            return sorted(up, key=lambda r: (r.load, r.index))
        capacity = math.ceil(self.load_factor * (sum(r.load for r in up) + 1) / len(up))
        ring = sorted(up, key=lambda r: _score(adapter_id, r.url), reverse=True)
        holders = [r for r in ring if r.held.get(adapter_id) in ("active", "cpu") and r.load < capacity]
        owners = [r for r in ring if r not in holders and r.load < capacity]
        return holders + owners + [r for r in ring if r not in holders and r not in owners]

    # ------------------------------------------------------------------ forwarding

    async def forward(self, request: Request, path: str, body: bytes | IO[bytes],
                      adapter_id: str | None) -> StreamingResponse:
        """`body`: the bytes, or a file holding them (an import: never whole in memory), read again per replica."""
        headers = {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}
        headers[INTERNAL_HEADER] = self.internal_key
        # The replica logs the request under this process's id, so one request's lines share it in both logs.
        headers["x-request-id"] = logs.request_id.get() or headers.get("x-request-id", "")
        failures = []
        for replica in self.candidates(adapter_id):
            replica.forwarded += 1
            try:
                upstream = await self.client.send(self.client.build_request(
                    request.method, f"{replica.url}{path}", headers=headers,
                    content=body if isinstance(body, bytes) else _file_chunks(body),
                    params=request.query_params), stream=True)
            except httpx.TransportError as exc:
                replica.forwarded -= 1
                replica.up = False
                replica.error = f"{type(exc).__name__}: {exc}"
                failures.append(f"replica {replica.index}: {replica.error}")
                continue
            if upstream.status_code in RETRY_STATUSES:
                reason = await _error_message(upstream)  # e.g. no adapter slot came free there in time
                await upstream.aclose()
                replica.forwarded -= 1
                failures.append(f"replica {replica.index}: HTTP {upstream.status_code}" + (f" ({reason})" if reason
                                                                                             else ""))
                continue
            if adapter_id is not None and upstream.status_code < 400:
                replica.held.setdefault(adapter_id, "active")  # it is loading it now; the next poll confirms
            return StreamingResponse(self._relay(upstream, replica), status_code=upstream.status_code,
                                     headers={**{n: upstream.headers[n] for n in RETURNED_HEADERS
                                                 if n in upstream.headers},
                                              "X-Adaptery-Replica": str(replica.index)})
        raise Unavailable("No inference replica could take the request: " + ("; ".join(failures) or "none listed"),
                          code="inference_unavailable", retry_after=1)

    async def unpin_everywhere(self, adapter_id: str) -> None:
        """The admin's unpin on every replica (a pin is per replica); a replica that is down holds no pins."""

        async def unpin(replica: Replica) -> None:
            try:
                answer = await self.client.post(f"{replica.url}/internal/adapters/{adapter_id}/unpin", timeout=10.0,
                                                headers={"Authorization": f"Bearer {self.internal_key}"})
            except httpx.HTTPError as exc:
                if replica.up:
                    raise Unavailable(f"Replica {replica.index} could not be reached to unpin the adapter: {exc}",
                                      code="inference_unavailable", retry_after=1) from None
                return
            if answer.status_code == 200:
                replica.pinned.discard(adapter_id)  # the next poll confirms

        await asyncio.gather(*(unpin(replica) for replica in self.replicas))

    async def drop_everywhere(self, adapter_ids: list[str]) -> None:
        """Deleted adapters leave every replica; a replica that is down holds nothing of them in memory, and its
        requests cannot reach them (the database says deleted)."""

        async def drop(replica: Replica, adapter_id: str) -> None:
            try:
                await self.client.post(f"{replica.url}/internal/adapters/{adapter_id}/drop", timeout=10.0,
                                       headers={"Authorization": f"Bearer {self.internal_key}"})
            except httpx.HTTPError as exc:
                log.warning("replica %s did not drop deleted adapter %s: %s", replica.index, adapter_id, exc)

        await asyncio.gather(*(drop(r, a) for r in self.replicas for a in adapter_ids))

    async def _relay(self, upstream: httpx.Response, replica: Replica) -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        finally:
            await upstream.aclose()  # the client left or the answer ended: the replica frees the sequence
            replica.forwarded -= 1


async def _error_message(upstream: httpx.Response) -> str:
    """The error message of a replica's refusal (the error shape), shortened; empty when it has none."""
    try:
        body = await upstream.aread()
        return str(json.loads(body[:8192])["error"]["message"])[:300]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return ""


_router: InferenceRouter | None = None


def get_router() -> InferenceRouter:
    if _router is None:
        raise Unavailable("Inference routing has not started.", code="inference_unavailable", retry_after=1)
    return _router


async def start(settings: Any) -> InferenceRouter:
    global _router
    urls = [u.strip() for u in settings.inference_urls.split(",") if u.strip()]
    _router = InferenceRouter(urls, internal_key=settings.internal_key, policy=settings.routing,
                              load_factor=settings.routing_load_factor, poll_seconds=settings.routing_poll_seconds)
    await _router.start()
    return _router


async def stop() -> None:
    global _router
    if _router is not None:
        await _router.close()
        _router = None


def residency(adapter_id: str) -> dict[str, Any] | None:
    return _router.residency(adapter_id) if _router is not None else None


def engine_gauges() -> dict[str, dict[str, Any]]:
    return _router.engine_gauges() if _router is not None else {}


async def _file_chunks(body: IO[bytes], size: int = 1 << 20) -> AsyncIterator[bytes]:
    """A file's bytes from its start, a chunk at a time, read off the event loop."""
    body.seek(0)
    while chunk := await asyncio.to_thread(body.read, size):
        yield chunk
