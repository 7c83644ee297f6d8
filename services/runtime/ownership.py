"""Session ownership: exactly one replica per stage serves a session, and a peer takes over when it dies.

- A new session reaches one replica per stage through the stage's queue group (``vbsys.claim.<stage>``);
  that replica writes the owner record with create-if-absent, so a duplicate claim cannot win twice.
- Each replica keeps one lease alive in the replicas bucket with heartbeats. Peers watch the leases;
  when a holder's lease has not moved for ``lease_ttl``, they race to rewrite its owner records with
  compare-and-set on the record's revision: one wins, the others see the new owner through the watch.
  No per-message TTL is involved (nats-server 2.9).
- A draining replica writes its records back with an empty owner ("released"), and peers take them
  at once instead of waiting for the lease to lapse.
- A replica that sees another owner on a record it holds (it was presumed dead) stops serving it.
- A lease lapses relative to the replica's own lease as its watch delivers it, so a NATS that is slow
  to store or deliver heartbeats (overload, a stall) does not make live peers look dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError

from proto import codec
from proto import subjects as sj
from proto.events import SCHEMA_VERSION, SessionSpec
from proto.system import ClaimReply, ClaimRequest, OwnerRecord, ReplicaLease
from services.runtime import metrics
from services.runtime.bus import Bus
from services.runtime.config import RuntimeConfig

log = logging.getLogger("voicebus.runtime.ownership")

KV_OPERATION = "KV-Operation"
#: How long a registered session may go without an owner for this stage before a replica sweeps it up.
ORPHAN_GRACE_S = 2.0

Acquire = Callable[[SessionSpec, int, str], Awaitable[None]]
Lose = Callable[[str, str], Awaitable[None]]


@dataclass(slots=True)
class _Owner:
    record: OwnerRecord
    revision: int


@dataclass(slots=True)
class _Peer:
    seen: float
    revision: int
    draining: bool


class Ownership:
    """Claims, heartbeats, watches and takeovers for one replica of one stage."""

    def __init__(self, bus: Bus, cfg: RuntimeConfig, on_acquire: Acquire, on_lose: Lose) -> None:
        self.bus, self.cfg = bus, cfg
        self.stage, self.replica = bus.stage, bus.replica
        self._on_acquire, self._on_lose = on_acquire, on_lose
        self.held: dict[str, int] = {}  # session -> epoch
        self._owners: dict[str, _Owner] = {}
        self._peers: dict[str, _Peer] = {}
        self._registry: dict[str, tuple[SessionSpec, float]] = {}
        self._claims_sub: Subscription | None = None
        self._watches: list[Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._claiming: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._started_ts = time.time_ns()
        self.draining = False
        self.lease_ok = False

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Heartbeat, watch owners, leases and sessions, and take claims."""
        await self._beat()
        self._watches = [
            await self._watch(sj.REPLICAS_BUCKET, f"{self.stage}.*", self._on_lease),
            await self._watch(sj.SESSIONS_BUCKET, "*", self._on_session),
            await self._watch(sj.OWNERS_BUCKET, f"{self.stage}.*", self._on_owner),
        ]
        await self._subscribe_claims()
        self._tasks = [
            asyncio.create_task(self._heartbeats(), name="lease-heartbeat"),
            asyncio.create_task(self._supervise(), name="lease-supervisor"),
            asyncio.create_task(self._on_reconnects(), name="lease-reconnects"),
        ]

    async def stop(self) -> None:
        """Stop every background task and watch (after drain)."""
        for task in [*self._tasks, *self._claiming]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._claiming, return_exceptions=True)
        for sub in [*self._watches, *([self._claims_sub] if self._claims_sub else [])]:
            with contextlib.suppress(Exception):  # the connection may be gone already
                await sub.unsubscribe()
        try:
            await self.bus.kv[sj.REPLICAS_BUCKET].delete(sj.replica_key(self.stage, self.replica))
        except Exception:  # peers fall back to the lease lapsing
            log.warning("could not delete own lease")

    async def begin_drain(self) -> None:
        """Stop taking sessions; peers see the lease marked draining."""
        self.draining = True
        if self._claims_sub is not None:
            await self._claims_sub.unsubscribe()
            self._claims_sub = None
        await self._beat()

    async def release(self, session: str) -> None:
        """Hand a session over: write its record back with no owner so a peer claims it at once."""
        self.held.pop(session, None)
        owner = self._owners.get(session)
        if owner is None or owner.record.replica != self.replica:
            return
        record = OwnerRecord(
            session=session, stage=self.stage, replica="", epoch=owner.record.epoch, claimed_ts=time.time_ns()
        )
        try:
            await self.bus.kv[sj.OWNERS_BUCKET].update(
                sj.owner_key(self.stage, session), codec.encode(record), last=owner.revision
            )
            metrics.releases.labels(self.stage, "handover").inc()
        except KeyWrongLastSequenceError:
            log.info("session %s was taken before it was handed over", session)

    async def finish(self, session: str) -> None:
        """The session ended: forget it and delete its owner record."""
        self.held.pop(session, None)
        with contextlib.suppress(NotFoundError):
            await self.bus.kv[sj.OWNERS_BUCKET].delete(sj.owner_key(self.stage, session))
        metrics.releases.labels(self.stage, "ended").inc()

    # --- claims through the queue group -----------------------------------------------------------

    async def _subscribe_claims(self) -> None:
        if self.draining or self._claims_sub is not None:
            return
        self._claims_sub = await self.bus.nc.subscribe(
            sj.CLAIM.subject(self.stage), queue=sj.queue_group(self.stage), cb=self._on_claim
        )

    async def _on_claim(self, msg: Msg) -> None:
        """Answer each claim in its own task: starting one session must not hold up the next claims."""
        task = asyncio.create_task(self._answer_claim(msg), name="claim")
        self._claiming.add(task)
        task.add_done_callback(self._claiming.discard)

    async def _answer_claim(self, msg: Msg) -> None:
        try:
            request = codec.decode_record(ClaimRequest, msg.data)
        except codec.ContractError as e:
            log.warning("refused claim request: %s", e)
            await msg.respond(
                codec.encode(
                    ClaimReply(
                        session="invalid",
                        stage=self.stage,
                        replica=self.replica,
                        epoch=0,
                        ok=False,
                        reason=str(e),
                    )
                )
            )
            return
        spec = request.spec
        if spec.schema_version != SCHEMA_VERSION:
            reason = f"schema version {spec.schema_version} is not {SCHEMA_VERSION}"
            reply = ClaimReply(
                session=spec.session, stage=self.stage, replica=self.replica, epoch=0, ok=False, reason=reason
            )
        else:
            reply = await self._claim(spec, how="queue")
        await msg.respond(codec.encode(reply))

    async def _claim(self, spec: SessionSpec, how: str) -> ClaimReply:
        """Create the owner record if there is none; report whoever owns the session now."""
        key = sj.owner_key(self.stage, spec.session)
        record = OwnerRecord(
            session=spec.session, stage=self.stage, replica=self.replica, epoch=1, claimed_ts=time.time_ns()
        )
        try:
            revision = await self.bus.kv[sj.OWNERS_BUCKET].create(key, codec.encode(record))
        except KeyWrongLastSequenceError:
            entry = await self.bus.kv[sj.OWNERS_BUCKET].get(key)
            current = codec.decode_record(OwnerRecord, entry.value or b"")
            if self._is_live(current.replica):
                return ClaimReply(
                    session=spec.session, stage=self.stage, replica=current.replica, epoch=current.epoch
                )
            won = await self._take(spec, _Owner(current, entry.revision or 0), how="takeover")
            return ClaimReply(
                session=spec.session,
                stage=self.stage,
                replica=self.replica if won else "",
                epoch=current.epoch + 1,
                ok=won,
                reason="" if won else "lost race",
            )
        self._owners[spec.session] = _Owner(record, revision)
        await self._acquired(spec, 1, how)
        return ClaimReply(session=spec.session, stage=self.stage, replica=self.replica, epoch=1)

    async def _take(self, spec: SessionSpec, owner: _Owner, how: str) -> bool:
        """Compare-and-set the owner record from a dead or released holder to this replica."""
        epoch = owner.record.epoch + 1
        record = OwnerRecord(
            session=spec.session,
            stage=self.stage,
            replica=self.replica,
            epoch=epoch,
            claimed_ts=time.time_ns(),
        )
        try:
            revision = await self.bus.kv[sj.OWNERS_BUCKET].update(
                sj.owner_key(self.stage, spec.session), codec.encode(record), last=owner.revision
            )
        except KeyWrongLastSequenceError:
            return False
        self._owners[spec.session] = _Owner(record, revision)
        await self._acquired(spec, epoch, how)
        return True

    async def _acquired(self, spec: SessionSpec, epoch: int, how: str) -> None:
        self.held[spec.session] = epoch
        metrics.claims.labels(self.stage, how).inc()
        log.info(
            "serving session %s (%s, epoch %d)", spec.session, how, epoch, extra={"session_id": spec.session}
        )
        await self._on_acquire(spec, epoch, how)
        if len(self.held) >= self.cfg.max_sessions and self._claims_sub is not None:
            await self._claims_sub.unsubscribe()  # full: let the queue group pick a peer
            self._claims_sub = None

    # --- heartbeats and watches -------------------------------------------------------------------

    async def _beat(self) -> None:
        lease = ReplicaLease(
            stage=self.stage,
            replica=self.replica,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_ts=self._started_ts,
            beat_ts=time.time_ns(),
            sessions=len(self.held),
            draining=self.draining,
        )
        try:
            await self.bus.kv[sj.REPLICAS_BUCKET].put(
                sj.replica_key(self.stage, self.replica), codec.encode(lease)
            )
            self.lease_ok = True
        except Exception as e:  # NATS down: keep serving, retry on the next beat
            self.lease_ok = False
            log.warning("lease heartbeat failed: %s", type(e).__name__)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_s)
            await self._beat()
            if not self.draining and len(self.held) < self.cfg.max_sessions:
                await self._subscribe_claims()

    async def _on_reconnects(self) -> None:
        """After a NATS outage nobody could beat: give every peer a fresh lease period."""
        while True:
            await self.bus.reconnected.wait()
            self.bus.reconnected.clear()
            now = time.monotonic()
            for peer in self._peers.values():
                peer.seen = now
            await self._beat()

    async def _watch(
        self, bucket: str, keys: str, cb: Callable[[str, bytes, int, bool], Awaitable[None]]
    ) -> Subscription:
        """Latest value of each key, then every change (our own watch: 1 s heartbeats to notice outages)."""
        subject = sj.kv_subject(bucket, keys)
        prefix_len = len(sj.kv_subject(bucket, ""))

        async def on_msg(msg: Msg) -> None:
            deleted = bool(msg.headers and msg.headers.get(KV_OPERATION) in ("DEL", "PURGE"))
            try:
                await cb(msg.subject[prefix_len:], msg.data, msg.metadata.sequence.stream, deleted)
            except Exception:
                log.exception("watch handler failed for %s", msg.subject)

        return await self.bus.js.subscribe(
            subject,
            stream=sj.kv_stream(bucket),
            cb=on_msg,
            ordered_consumer=True,
            idle_heartbeat=1.0,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        )

    async def _on_lease(self, key: str, data: bytes, revision: int, deleted: bool) -> None:
        replica = key.split(".", 1)[1]
        if deleted:
            self._peers.pop(replica, None)
            return
        lease = codec.decode_record(ReplicaLease, data)
        self._peers[replica] = _Peer(seen=time.monotonic(), revision=revision, draining=lease.draining)

    async def _on_session(self, key: str, data: bytes, revision: int, deleted: bool) -> None:
        if deleted:
            self._registry.pop(key, None)
            return
        try:
            spec = codec.decode_record(SessionSpec, data)
        except codec.ContractError as e:
            log.warning("unreadable session record %s: %s", key, e)
            return
        self._registry.setdefault(key, (spec, time.monotonic()))

    async def _on_owner(self, key: str, data: bytes, revision: int, deleted: bool) -> None:
        session = key.split(".", 1)[1]
        if deleted:
            self._owners.pop(session, None)
            return
        record = codec.decode_record(OwnerRecord, data)
        self._owners[session] = _Owner(record, revision)
        if session in self.held and record.replica != self.replica:
            self.held.pop(session, None)
            metrics.releases.labels(self.stage, "taken").inc()
            log.warning("session %s was taken over by %s", session, record.replica or "nobody")
            await self._on_lose(session, "taken")

    def _is_live(self, replica: str) -> bool:
        if not replica:
            return False
        if replica == self.replica:
            return True
        peer = self._peers.get(replica)
        if peer is None:
            return False
        # Measured against our own lease as the watch delivered it, not the clock: when NATS is slow
        # (overloaded, stalled) every lease arrives late, ours included, and nobody is presumed dead.
        own = self._peers.get(self.replica)
        reference = own.seen if own is not None else time.monotonic()
        return reference - peer.seen < self.cfg.lease_ttl_s

    # --- takeover ---------------------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Take sessions whose holder's lease lapsed or who were handed over; sweep up orphans."""
        while True:
            await asyncio.sleep(self.cfg.heartbeat_s)
            if self.draining or not self.lease_ok:
                continue
            try:
                await self._sweep()
            except Exception:
                log.exception("takeover sweep failed")

    async def _sweep(self) -> None:
        now = time.monotonic()
        for session, owner in list(self._owners.items()):
            if len(self.held) >= self.cfg.max_sessions:
                return
            if session in self.held or self._is_live(owner.record.replica):
                continue
            entry = self._registry.get(session)
            if entry is None:
                continue  # ended, or not yet seen in the registry
            await self._take(entry[0], owner, how="released" if not owner.record.replica else "takeover")
        for session, (spec, seen) in list(self._registry.items()):
            if (
                session not in self._owners
                and now - seen > ORPHAN_GRACE_S
                and len(self.held) < self.cfg.max_sessions
            ):
                await self._claim(spec, how="orphan")
