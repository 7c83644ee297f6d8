"""How a stage serves sessions: the per-session worker interface, its context, and the process runner.

A stage implements ``SessionWorker``: one object per session it owns, fed the session's events on the
conversation channels the contract lists the stage as consuming (``on_event``) and the audio of the
``media`` channels it names (``on_media``). The
runtime does the rest, the same way for every stage: claims and takeovers, feeds that resume after
the last checkpoint, bad-message handling, health, metrics, tracing, and the drain on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

import msgspec
from aiohttp import web
from nats.aio.subscription import Subscription
from nats.js.errors import NotFoundError

from proto import codec
from proto import events as ev
from proto import subjects as sj
from proto.system import Checkpoint
from services.runtime import health, log, metrics, tracing, usage
from services.runtime.bus import Bus, Delivery, Handler
from services.runtime.config import RuntimeConfig, default_replica_id, load
from services.runtime.ownership import Ownership

S = TypeVar("S", bound=msgspec.Struct)
EVENTS_FEED = "events"  # cursor key of the conversation feed; media feeds use their channel's name
logger = logging.getLogger("voicebus.runtime")


class SessionContext(Generic[S]):
    """What a worker may do with its session: publish, mark timings, report, checkpoint, spawn."""

    def __init__(self, bus: Bus, spec: ev.SessionSpec, epoch: int, how: str, restored: S | None) -> None:
        self.bus, self.spec, self.epoch, self.how = bus, spec, epoch, how
        self.session = spec.session
        self.stage: ev.Stage = bus.stage  # type: ignore[assignment]
        self.restored = restored
        #: Stream sequence of the last event handed to the worker, per feed ("events" or a media channel).
        #: A worker may lower a feed's cursor in ``start`` to read again what its predecessor had taken
        #: in but not finished with (egress: frames queued for playout).
        self.cursors: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    async def publish(self, channel: sj.Channel, event: ev.Event) -> ev.Event:
        """Publish one of this session's events; returns it stamped with seq and ts."""
        return await self.bus.publish(channel, event)

    async def mark(self, turn: int, mark: str, at_ns: int | None = None) -> None:
        """Put a point on the turn's timeline (per-turn table, benchmark phases)."""
        await self.bus.publish(
            sj.TIMING,
            ev.TurnMark(
                session=self.session,
                turn=turn,
                stage=self.stage,
                mark=mark,  # type: ignore[arg-type]
                at_ns=at_ns or time.time_ns(),
            ),
        )

    async def report(self, code: str, message: str, *, turn: int = -1, retryable: bool = False) -> None:
        """Publish an ErrorEvent for this session."""
        await self.bus.report(self.session, code, message, turn=turn, retryable=retryable)

    async def end(self, reason: str) -> None:
        """End the call for every stage (max duration, inactivity, hang-up seen at the edge)."""
        await self.publish(sj.CONTROL, ev.SessionEnded(session=self.session, reason=reason))  # type: ignore[arg-type]

    async def checkpoint(self, state: S) -> None:
        """Save ``state`` as reflecting every event handled so far, the current one included.

        A replica that takes the session over restores it and resumes after these events.
        """
        record = Checkpoint(
            session=self.session,
            stage=self.stage,
            epoch=self.epoch,
            cursors=dict(self.cursors),
            state=codec.encode(state),
            saved_ts=time.time_ns(),
        )
        await self.bus.kv[sj.STATE_BUCKET].put(sj.state_key(self.stage, self.session), codec.encode(record))

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` as part of the session: cancelled and awaited when the session closes."""
        task = asyncio.create_task(coro, name=f"{self.stage}:{self.session}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("session task %s failed", task.get_name(), exc_info=exc)

    async def cancel_tasks(self) -> None:
        """Cancel the session's tasks and wait for them."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class SessionWorker(Generic[S]):
    """A stage's behaviour for one session. Override what the stage needs."""

    #: Audio channels this stage consumes besides the session's conversation events (a class
    #: attribute, or set in ``__init__`` when it depends on the session).
    media: tuple[sj.Channel, ...] = ()

    def __init__(self, ctx: SessionContext[S]) -> None:
        self.ctx = ctx

    async def start(self) -> None:
        """Called once the feeds are about to start (restore from ``ctx.restored`` here)."""

    async def on_event(self, event: ev.Event, delivery: Delivery) -> None:
        """An event of a conversation channel this stage consumes (proto/subjects.py), in stream order."""

    async def on_media(self, event: ev.Event, delivery: Delivery) -> None:
        """An event of one of the ``media`` channels (``delivery.subject`` says which), in stream order."""

    async def idle(self) -> None:
        """Return once no turn is in flight (drain waits for this before handing the session over)."""

    async def close(self, handover: bool) -> None:
        """Stop the session's work; on ``handover``, checkpoint so the next replica resumes here."""


WorkerFactory = Callable[[SessionContext[Any]], SessionWorker[Any]]


class _Hosted:
    """A session this replica serves: its worker, its feeds and its context."""

    def __init__(self, ctx: SessionContext[Any], worker: SessionWorker[Any]) -> None:
        self.ctx, self.worker = ctx, worker
        self.subs: list[Subscription] = []
        self.closed = False

    async def stop_feeds(self) -> None:
        for sub in self.subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self.subs.clear()


class StageService:
    """Runs one stage's replica: ownership, per-session workers, health, drain."""

    def __init__(
        self,
        stage: ev.Stage,
        factory: WorkerFactory,
        *,
        state_type: type[msgspec.Struct] | None = None,
        cfg: RuntimeConfig | None = None,
    ) -> None:
        self.stage, self.factory, self.state_type = stage, factory, state_type
        self.cfg = cfg or load(RuntimeConfig)
        self.replica = self.cfg.replica or default_replica_id()
        self.sessions: dict[str, _Hosted] = {}
        self.bus: Bus | None = None
        self.ownership: Ownership | None = None
        self.http: health.HealthServer | None = None
        self._stop = asyncio.Event()
        self._draining = False
        self._tasks: set[asyncio.Task[None]] = set()

    def _background(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- process lifecycle ------------------------------------------------------------------------

    async def run(self, *, routes: Callable[[web.Application], None] | None = None) -> int:
        """Serve until SIGTERM/SIGINT, then drain; returns the exit code."""
        tracing.setup(
            self.stage,
            self.replica,
            self.cfg.trace_exporter,
            trace_file=self.cfg.trace_file,
            otlp_endpoint=self.cfg.otlp_endpoint,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        self.http = health.HealthServer(self.cfg.http_host, self.cfg.http_port, self.readiness)
        if routes is not None:
            routes(self.http.app)
        await self.http.start()
        self.bus = await Bus.connect(self.cfg, self.stage, self.replica)
        self.ownership = Ownership(self.bus, self.cfg, self._acquire, self._lose)
        await self.ownership.start()
        logger.info(
            "%s replica %s ready",
            self.stage,
            self.replica,
            extra={"http_port": self.http.port, "replica": self.replica},
        )
        await self._stop.wait()
        await self.drain()
        return 0

    def readiness(self) -> tuple[bool, str]:
        """Ready when connected, holding a lease and not draining."""
        if self._draining:
            return False, "draining"
        if self.bus is None or not self.bus.nc.is_connected:
            return False, "not connected to nats"
        if self.ownership is None or not self.ownership.lease_ok:
            return False, "no lease"
        return True, "ok"

    async def drain(self) -> None:
        """Stop claiming, let turns in flight finish (up to the drain timeout), hand sessions over, exit."""
        self._draining = True
        assert self.bus is not None and self.ownership is not None
        logger.info("draining %d sessions", len(self.sessions))
        await self.ownership.begin_drain()
        deadline = time.monotonic() + self.cfg.drain_timeout_s
        await asyncio.gather(*(self._hand_over(sid, deadline) for sid in list(self.sessions)))
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.ownership.stop()
        if self.http is not None:
            await self.http.stop()
        await self.bus.close()
        tracing.shutdown()
        logger.info("drained")

    async def _hand_over(self, session: str, deadline: float) -> None:
        hosted = self.sessions.get(session)
        if hosted is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(hosted.worker.idle(), max(0.0, deadline - time.monotonic()))
        await self._close(session, handover=True)
        assert self.ownership is not None
        await self.ownership.release(session)

    # --- sessions ---------------------------------------------------------------------------------

    async def _acquire(self, spec: ev.SessionSpec, epoch: int, how: str) -> None:
        assert self.bus is not None
        checkpoint = await self._load_checkpoint(spec.session) if how != "queue" else None
        restored = None
        if checkpoint is not None and self.state_type is not None and checkpoint.state:
            restored = codec.decode_record(self.state_type, checkpoint.state)
        ctx: SessionContext[Any] = SessionContext(self.bus, spec, epoch, how, restored)
        if checkpoint is not None:
            ctx.cursors = dict(checkpoint.cursors)
        self.bus.set_epoch(spec.session, epoch)
        worker = self.factory(ctx)
        hosted = _Hosted(ctx, worker)
        self.sessions[spec.session] = hosted
        metrics.sessions_owned.labels(self.stage).set(len(self.sessions))
        try:
            await worker.start()
            feeds = [(EVENTS_FEED, sj.feed(spec.session, self.stage), hosted.worker.on_event)]
            feeds += [(c.name, [c.subject(spec.session)], hosted.worker.on_media) for c in worker.media]
            for feed, subjects, handler in feeds:
                after = ctx.cursors.get(feed, 0)
                hosted.subs.append(await self.bus.follow(subjects, after, self._feed(hosted, feed, handler)))
        except Exception:
            logger.exception("could not start serving session %s; handing it back", spec.session)
            await self._close(spec.session, handover=False)
            assert self.ownership is not None
            await self.ownership.release(spec.session)

    async def _load_checkpoint(self, session: str) -> Checkpoint | None:
        assert self.bus is not None
        try:
            entry = await self.bus.kv[sj.STATE_BUCKET].get(sj.state_key(self.stage, session))
        except NotFoundError:
            return None
        if not entry.value:
            return None
        return codec.decode_record(Checkpoint, entry.value)

    def _feed(self, hosted: _Hosted, feed: str, handler: Handler) -> Handler:
        async def handle(event: ev.Event, delivery: Delivery) -> None:
            if hosted.closed:
                return
            hosted.ctx.cursors[feed] = delivery.stream_seq  # a checkpoint taken now includes this event
            await handler(event, delivery)
            if isinstance(event, ev.SessionEnded):
                # not awaited here: ending the session unsubscribes the feed this handler runs in
                self._background(self._end(event.session), f"end:{event.session}")

        return handle

    async def _close(self, session: str, *, handover: bool) -> None:
        hosted = self.sessions.pop(session, None)
        if hosted is None or hosted.closed:
            return
        hosted.closed = True
        await hosted.stop_feeds()
        try:
            await hosted.worker.close(handover)
        finally:
            await hosted.ctx.cancel_tasks()
            assert self.bus is not None
            self.bus.forget(session)
            metrics.sessions_owned.labels(self.stage).set(len(self.sessions))

    async def _end(self, session: str) -> None:
        await self._close(session, handover=False)
        assert self.bus is not None and self.ownership is not None
        await self.ownership.finish(session)
        with contextlib.suppress(NotFoundError):
            await self.bus.kv[sj.STATE_BUCKET].delete(sj.state_key(self.stage, session))

    async def _lose(self, session: str, why: str) -> None:
        await self._close(session, handover=False)


def run(
    stage: ev.Stage,
    factory: WorkerFactory,
    *,
    state_type: type[msgspec.Struct] | None = None,
    routes: Callable[[web.Application], None] | None = None,
) -> int:
    """Entry point of a stage process: JSON logs, config from the environment, serve until SIGTERM."""
    cfg = load(RuntimeConfig)
    log.setup(cfg.log_level, redact_pii=cfg.redact_pii)
    usage.configure(load(usage.Pricing))
    service = StageService(stage, factory, state_type=state_type, cfg=cfg)
    return asyncio.run(service.run(routes=routes))
