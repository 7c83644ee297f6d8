"""Opening and ending sessions: what a gateway, the demo, the replay tool and the benchmarks call.

Opening registers the session, asks each stage's queue group for an owner (so the call starts only
once every stage serves it), then announces SessionStarted on the session's control channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import NotFoundError

from proto import codec
from proto import events as ev
from proto import subjects as sj
from proto.system import ClaimReply, ClaimRequest
from services.runtime.bus import Bus

#: How long one claim request waits for its answer before asking again (the replica that got it may
#: have died; a loaded one takes a while to start serving, and asking again only adds to its queue).
CLAIM_ANSWER_S = 3.0


class SessionOpenError(RuntimeError):
    """A stage did not take the session (no replica running, or it refused)."""


async def open_session(
    bus: Bus, spec: ev.SessionSpec, *, stages: tuple[str, ...] = ev.STAGES, timeout_s: float = 10.0
) -> dict[str, ClaimReply]:
    """Register ``spec``, get an owner in every stage, announce SessionStarted; returns the owners."""
    spec = msgspec.structs.replace(spec, opened_ts=spec.opened_ts or time.time_ns())
    await bus.kv[sj.SESSIONS_BUCKET].put(spec.session, codec.encode(spec))
    request = codec.encode(ClaimRequest(spec=spec))
    replies = await asyncio.gather(*(_claim(bus, stage, request, timeout_s) for stage in stages))
    await bus.publish(sj.CONTROL, ev.SessionStarted(session=spec.session, spec=spec))
    return dict(zip(stages, replies, strict=True))


async def _claim(bus: Bus, stage: str, request: bytes, timeout_s: float) -> ClaimReply:
    deadline = time.monotonic() + timeout_s
    last = "no replica answered"
    while time.monotonic() < deadline:
        try:
            wait = min(CLAIM_ANSWER_S, max(0.1, deadline - time.monotonic()))
            msg = await bus.nc.request(sj.CLAIM.subject(stage), request, timeout=wait)
        except NoRespondersError:
            last = f"no {stage} replica is running"
            await asyncio.sleep(0.2)
            continue
        except NatsTimeout:
            last = f"{stage} replica did not answer"
            continue
        reply = codec.decode_record(ClaimReply, msg.data)
        if reply.ok:
            return reply
        last = reply.reason
        if "schema version" in last:
            break
    raise SessionOpenError(f"{stage}: {last}")


async def end_session(bus: Bus, session: str, reason: str = "hangup") -> None:
    """Announce the end of the call to every stage and drop the session from the registry."""
    await bus.publish(sj.CONTROL, ev.SessionEnded(session=session, reason=reason))  # type: ignore[arg-type]
    with contextlib.suppress(NotFoundError):
        await bus.kv[sj.SESSIONS_BUCKET].delete(session)
