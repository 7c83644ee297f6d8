"""The NATS connection every service uses: publish events, follow a session's feeds, KV buckets.

Publishing: media (audio frames) goes out fire-and-forget, recorded by the events stream on the way;
conversation events (transcripts, turns, replies, control...) are published to JetStream and wait
for the stream's ack, retried with a de-duplication id so a retry never stores an event twice.

Following: a stage follows a session through JetStream ordered consumers, one on the session's
conversation subjects and one on its audio subject. They start where the stage's last checkpoint
left off, so a replica taking a session over reads what its predecessor had not yet handled.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue
from opentelemetry.context import Context

from proto import codec
from proto import events as ev
from proto import subjects as sj
from services.runtime import metrics, tracing
from services.runtime.config import RuntimeConfig
from services.runtime.log import session_var

log = logging.getLogger("voicebus.runtime.bus")

PUBLISH_DEADLINE_S = 10.0
MSG_ID = "Nats-Msg-Id"
V1_ACK_TOKENS = 9


@dataclass(frozen=True, slots=True)
class Delivery:
    """Where a consumed event sits in the stream, and the trace context it carried."""

    subject: str
    stream_seq: int
    parent: Context | None


Handler = Callable[[ev.Event, Delivery], Awaitable[None]]


def stream_seq(reply: str) -> int:
    """The stream sequence of a JetStream delivery, from its ack subject.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>...`` (9 tokens), or with the domain and
    account hash after ``ACK``. nats-py's ``Msg.metadata`` parses the same subject into an object with
    a datetime: a cost paid 50 times a second per audio feed, for one integer.
    """
    tokens = reply.split(".")
    return int(tokens[5] if len(tokens) == V1_ACK_TOKENS else tokens[Msg.Ack.StreamSeq])


class Bus:
    """One NATS connection per process, shared by all the sessions a replica serves."""

    def __init__(self, nc: NATS, stage: str, replica: str) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=5.0)
        self.stage = stage
        self.replica = replica
        self._seq: dict[tuple[str, str], int] = {}
        self._epochs: dict[str, int] = {}
        self.kv: dict[str, KeyValue] = {}
        self.reconnected: asyncio.Event = asyncio.Event()
        self.closing = False
        self._resuming: set[asyncio.Task[None]] = set()
        self._sent = metrics.Children(metrics.messages_out, stage)
        self._received = metrics.Children(metrics.messages_in, stage)

    # --- connection -------------------------------------------------------------------------------

    @classmethod
    async def connect(cls, cfg: RuntimeConfig, stage: str, replica: str, *, setup: bool = True) -> Bus:
        """Connect with endless reconnects and back-off, then create the stream and buckets if needed."""
        holder: list[Bus] = []

        async def on_error(e: Exception) -> None:
            log.warning("nats error: %s", e)

        async def on_disconnect() -> None:
            if holder and not holder[0].closing:
                log.warning("disconnected from nats")

        async def on_reconnect() -> None:
            log.info("reconnected to nats")
            if holder:
                holder[0].reconnected.set()
                holder[0]._resume_consumers()

        tls = ssl.create_default_context(cafile=cfg.nats_tls_ca) if cfg.nats_tls_ca else None
        nc = await nats.connect(
            servers=[s.strip() for s in cfg.nats_url.split(",")],
            name=f"voicebus-{stage}-{replica}",
            user=cfg.nats_user or None,
            password=cfg.nats_password or None,
            tls=tls,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,
            connect_timeout=2,
            ping_interval=5,
            max_outstanding_pings=3,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            pending_size=16 * 1024 * 1024,
        )
        bus = cls(nc, stage, replica)
        holder.append(bus)
        if setup:
            await bus.setup(cfg)
        return bus

    async def setup(self, cfg: RuntimeConfig) -> None:
        """Create (or confirm) the events stream and the KV buckets; safe from many replicas at once."""
        stream = StreamConfig(
            name=sj.EVENTS_STREAM,
            subjects=sj.recorded_patterns(),
            storage=StorageType.FILE,
            max_age=cfg.events_max_age_s,
            max_bytes=cfg.events_max_bytes,
            discard=DiscardPolicy.OLD,
            duplicate_window=120.0,
        )
        try:
            await self.js.add_stream(stream)
        except BadRequestError:
            await self.js.update_stream(stream)
        # Replica leases expire on their own after a while so dead replicas do not pile up; owner
        # records and checkpoints live as long as their session (deleted when it ends).
        buckets = {
            sj.SESSIONS_BUCKET: 0.0,
            sj.OWNERS_BUCKET: 0.0,
            sj.REPLICAS_BUCKET: max(60.0, cfg.lease_ttl_s * 10),
            sj.STATE_BUCKET: 0.0,
        }
        for name, ttl in buckets.items():
            self.kv[name] = await self._bucket(name, ttl)

    async def _bucket(self, name: str, ttl: float) -> KeyValue:
        try:
            return await self.js.key_value(name)
        except (NotFoundError, nats.js.errors.BucketNotFoundError):
            pass
        config = KeyValueConfig(bucket=name, history=1, ttl=ttl or None, storage=StorageType.FILE)
        try:
            return await self.js.create_key_value(config)
        except BadRequestError:  # created by a peer in the meantime
            return await self.js.key_value(name)

    def _resume_consumers(self) -> None:
        """After a reconnect, restart every ordered consumer at once after the last event it delivered.

        A restarted nats-server has lost them; the client would notice only after two missed idle
        heartbeats (2 s of a silent call). This uses the client's own reset, which nats-py does not
        expose; if it fails (JetStream still recovering), the heartbeat check resets the consumer later.
        """

        async def resume() -> None:
            for sub in list(self.nc._subs.values()):
                jsi = getattr(sub, "_jsi", None)
                if jsi is not None and jsi._ordered:
                    try:
                        await jsi.reset_ordered_consumer(jsi._sseq + 1)
                    except Exception as e:  # the heartbeat check resets it later
                        log.warning("could not resume a consumer after reconnect: %s", type(e).__name__)

        task = asyncio.create_task(resume(), name="resume-consumers")
        self._resuming.add(task)
        task.add_done_callback(self._resuming.discard)

    async def close(self) -> None:
        """Flush what is buffered and close the connection."""
        self.closing = True
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except (TimeoutError, NatsTimeout, nats.errors.ConnectionClosedError):
                await self.nc.close()

    # --- publishing -------------------------------------------------------------------------------

    def set_epoch(self, session: str, epoch: int) -> None:
        """Sequence numbers of this replica's events for ``session`` start above earlier owners'."""
        self._epochs[session] = epoch

    def forget(self, session: str) -> None:
        """Drop the per-session counters of a session this replica no longer serves."""
        self._epochs.pop(session, None)
        for key in [k for k in self._seq if k[0] == session]:
            del self._seq[key]

    def _next_seq(self, session: str, channel: str) -> int:
        key = (session, channel)
        n = self._seq.get(key, 0) + 1
        self._seq[key] = n
        return (self._epochs.get(session, 0) << 32) | n

    async def publish(
        self, channel: sj.Channel, event: ev.Event, *, headers: dict[str, str] | None = None
    ) -> ev.Event:
        """Stamp, encode and publish ``event`` on its session's ``channel``; returns the stamped event.

        Events of ``acked`` channels wait for the stream's ack (retried until ``PUBLISH_DEADLINE_S``);
        media and timing marks are sent without waiting. The current span's trace context rides in the
        headers.
        """
        stamped = codec.stamp(event, self._next_seq(event.session, channel.name), time.time_ns())
        data = codec.encode(stamped)
        subject = channel.subject(event.session)
        hdrs = tracing.inject(headers)
        if not channel.acked:
            await self.nc.publish(subject, data, headers=hdrs or None)
        else:
            hdrs[MSG_ID] = f"{event.session}.{channel.name}.{self.stage}.{stamped.seq}"
            await self._publish_acked(subject, data, hdrs)
        self._sent[channel.name].inc()
        return stamped

    async def _publish_acked(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        deadline = time.monotonic() + PUBLISH_DEADLINE_S
        delay = 0.05
        while True:
            try:
                await self.js.publish(subject, data, headers=headers, timeout=1.0)
                return
            except (NatsTimeout, NoRespondersError, nats.errors.ConnectionReconnectingError) as e:
                if time.monotonic() + delay > deadline:
                    raise
                metrics.publish_retries.labels(self.stage).inc()
                log.warning("publish to %s not acked (%s), retrying", subject, type(e).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def report(
        self,
        session: str,
        code: str,
        message: str,
        *,
        subject: str = "",
        turn: int = -1,
        retryable: bool = False,
    ) -> None:
        """Publish an ErrorEvent for ``session``; never raises (an error report must not fail a stage)."""
        try:
            await self.publish(
                sj.ERROR,
                ev.ErrorEvent(
                    session=session,
                    stage=self.stage,  # type: ignore[arg-type]
                    code=code,  # type: ignore[arg-type]
                    message=message[:2000],
                    subject=subject,
                    turn=turn,
                    retryable=retryable,
                ),
            )
        except Exception:  # reporting is best effort; the caller logged already
            log.exception("could not publish error event")

    # --- following --------------------------------------------------------------------------------

    async def follow(self, subjects: list[str], after_seq: int, handler: Handler) -> Subscription:
        """Deliver the events on ``subjects`` (one session's) after stream sequence ``after_seq``, in order.

        ``after_seq`` 0 starts at the beginning of the session.

        Bad messages are reported as ErrorEvents and skipped; a handler that raises is logged and
        counted, and the feed goes on with the next event.
        """
        subject = subjects[0]
        session = subject.split(".")[1]

        async def on_msg(msg: Msg) -> None:
            session_var.set(session)
            seq = stream_seq(msg.reply)
            try:
                event = codec.decode(msg.subject, msg.data)
            except codec.ContractError as e:
                metrics.bad_messages.labels(self.stage, e.code).inc()
                log.warning("refused message on %s: %s", msg.subject, e)
                await self.report(session, e.code, str(e), subject=msg.subject)
                return
            channel = msg.subject.split(".", 2)[2]
            self._received[channel].inc()
            try:
                await handler(event, Delivery(msg.subject, seq, tracing.extract(msg.headers)))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                metrics.handler_errors.labels(self.stage, channel).inc()
                log.exception("handler failed on %s", type(event).__name__)
                await self.report(session, "internal", f"{type(event).__name__}: {e}", subject=msg.subject)

        config = ConsumerConfig(filter_subjects=subjects if len(subjects) > 1 else None)
        policy = DeliverPolicy.ALL
        if after_seq > 0:
            policy, config.opt_start_seq = DeliverPolicy.BY_START_SEQUENCE, after_seq + 1
        return await self.js.subscribe(
            subject,
            stream=sj.EVENTS_STREAM,
            cb=on_msg,
            ordered_consumer=True,
            idle_heartbeat=1.0,
            pending_msgs_limit=4096,
            deliver_policy=policy,
            config=config,
        )
