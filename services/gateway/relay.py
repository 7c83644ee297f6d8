"""Relaying a browser's SDP offer to the replica that owns the session's ingress (WHIP) or egress (WHEP)."""

from __future__ import annotations

import asyncio
import time

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from proto import codec
from proto import subjects as sj
from proto.system import SdpAnswer, SdpOffer
from services.runtime.bus import Bus

#: Pause between asks while no replica listens yet (the session is starting, or being taken over).
RETRY_S = 0.05


class NoOwner(RuntimeError):
    """No replica of the stage answered for the session in time."""


class OfferRefused(RuntimeError):
    """The owner refused the offer; ``code`` is the answer's ``error``."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


async def relay_offer(bus: Bus, stage: str, session: str, sdp: str, timeout_s: float) -> SdpAnswer:
    """Ask ``stage``'s owner of ``session`` to answer ``sdp``; returns its answer.

    Until a replica subscribes (it does so when it starts serving the session) the request has no
    responders: it is asked again until ``timeout_s``.
    """
    request = codec.encode(SdpOffer(session=session, sdp=sdp))
    subject = sj.SIGNAL.session_subject(stage, session)
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            msg = await bus.nc.request(subject, request, timeout=remaining)
        except NoRespondersError:
            await asyncio.sleep(min(RETRY_S, remaining))
            continue
        except NatsTimeout:
            break
        answer = codec.decode_record(SdpAnswer, msg.data)
        if not answer.ok:
            raise OfferRefused(answer.error, answer.reason)
        return answer
    raise NoOwner(f"no {stage} replica answered for session {session} within {timeout_s:g} s")
