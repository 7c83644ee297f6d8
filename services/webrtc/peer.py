"""One media leg of a session served to a WebRTC peer, its SDP answered over the bus.

The gateway relays a browser's offer (WHIP or WHEP) on ``vbsys.signal.<stage>.<session>``; the replica
owning the session in that stage answers it here. ICE is not trickled: aiortc gathers its candidates
while it sets the answer, so the answer carries them all and one request/reply sets the call up. A new
offer replaces the leg's peer connection (a reload, or a reconnect after the previous owner died).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import aioice.ice
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.jitterbuffer import JitterBuffer
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpreceiver import RTCRtpReceiver
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import Counter, Histogram

from proto import codec
from proto import subjects as sj
from proto.system import SdpAnswer, SdpOffer
from services.runtime.bus import Bus
from services.runtime.metrics import LATENCY_BUCKETS

logger = logging.getLogger("voicebus.webrtc")

offers = Counter("vb_webrtc_offers_total", "SDP offers answered or refused, by outcome", ["stage", "outcome"])
connect_seconds = Histogram(
    "vb_webrtc_connect_seconds",
    "From an offer's arrival to the peer connection being connected (ICE and DTLS)",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)

#: Slots of the caller's jitter buffer (aiortc's own size for audio; a power of two).
JITTER_CAPACITY = 16


class OfferRefused(ValueError):
    """An offer this leg cannot answer (not SDP, no audio); the message says why, for the HTTP client."""


class LegClosed(RuntimeError):
    """The session ended while its offer was being answered."""


def use_host_addresses(addresses: tuple[str, ...]) -> None:
    """Offer exactly ``addresses`` as ICE host candidates, in this process.

    aioice gathers every interface's address except 127.0.0.1 and offers no setting for it, so its
    lookup is replaced: the one hook there is. Needed where the browser reaches the replica only over
    loopback (a laptop without a network, CI), or to offer just the pod's address in a cluster.
    """
    chosen = list(addresses)

    def configured(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in chosen if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = configured


def strip_mdns(sdp: str) -> str:
    """The offer without mDNS (``.local``) candidates.

    Browsers hide their addresses behind mDNS names until the page may capture media; resolving them
    would stall the answer, and the browser's checks reach us anyway (peer-reflexive candidates).
    """
    lines = sdp.splitlines()
    kept = [line for line in lines if not (line.startswith("a=candidate:") and ".local " in line)]
    return "\r\n".join(kept) + "\r\n"


def shorten_jitter_buffer(receiver: RTCRtpReceiver, prefetch: int) -> None:
    """Decode the caller's audio after ``prefetch`` packets instead of aiortc's fixed 4 (80 ms).

    aiortc builds the buffer in the receiver's constructor with no parameter for it; replacing it before
    the first packet arrives is the only way (measured: uplink p50 124 ms -> 61 ms with 0).
    """
    attribute = "_RTCRtpReceiver__jitter_buffer"
    if not hasattr(receiver, attribute):
        raise RuntimeError("aiortc's RTCRtpReceiver no longer has the jitter buffer this replaces")
    setattr(receiver, attribute, JitterBuffer(capacity=JITTER_CAPACITY, prefetch=prefetch))


class PeerLeg:
    """A session's microphone or voice leg: answers offers, owns the current peer connection.

    ``send`` makes the track sent to the peer (the agent's voice), once per peer connection;
    ``receive`` consumes the peer's track (the caller's microphone) until it ends or the connection is
    replaced. ``on_state`` hears every connection state change of the current peer connection.
    """

    def __init__(
        self,
        bus: Bus,
        stage: str,
        session: str,
        *,
        send: Callable[[], MediaStreamTrack] | None = None,
        receive: Callable[[MediaStreamTrack], Awaitable[None]] | None = None,
        jitter_prefetch: int = 0,
        on_state: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.bus, self.stage, self.session = bus, stage, session
        self._send, self._receive = send, receive
        self._prefetch = jitter_prefetch
        self._on_state = on_state
        self._pc: RTCPeerConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._sub: Subscription | None = None
        self._closed = False

    async def start(self) -> None:
        """Answer offers from now on (the subscription is in place when this returns)."""
        self._sub = await self.bus.nc.subscribe(
            sj.SIGNAL.session_subject(self.stage, self.session), cb=self._on_offer
        )

    async def close(self) -> None:
        """Stop answering and hang up the current peer connection."""
        self._closed = True
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        await self._replace(None)

    async def _on_offer(self, msg: Msg) -> None:
        try:
            offer = codec.decode_record(SdpOffer, msg.data)
            sdp = await self._answer(offer.sdp)
            reply = SdpAnswer(session=self.session, sdp=sdp, replica=self.bus.replica)
            offers.labels(self.stage, "answered").inc()
        except (OfferRefused, codec.ContractError) as e:
            reply = SdpAnswer(session=self.session, ok=False, error="bad_sdp", reason=str(e))
            offers.labels(self.stage, "refused").inc()
        except LegClosed as e:
            reply = SdpAnswer(session=self.session, ok=False, error="not_served", reason=str(e))
            offers.labels(self.stage, "refused").inc()
        except Exception as e:
            logger.exception("could not answer an offer for %s", self.session)
            reply = SdpAnswer(session=self.session, ok=False, error="internal", reason=type(e).__name__)
            offers.labels(self.stage, "failed").inc()
        await msg.respond(codec.encode(reply))

    async def _answer(self, offer_sdp: str) -> str:
        arrived = time.monotonic()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        tracks: list[MediaStreamTrack] = []
        if self._receive is not None:
            pc.on("track", tracks.append)
        try:
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=strip_mdns(offer_sdp), type="offer"))
            except ValueError as e:
                raise OfferRefused(f"the offer cannot be used: {e}") from None
            audio = [t for t in pc.getTransceivers() if t.kind == "audio"]
            if not audio:
                raise OfferRefused("the offer has no audio section")
            if self._receive is not None:
                shorten_jitter_buffer(audio[0].receiver, self._prefetch)
            if self._send is not None:
                pc.addTrack(self._send())
            await pc.setLocalDescription(await pc.createAnswer())
            if self._closed:
                raise LegClosed(f"session {self.session} has ended")
        except BaseException:
            await pc.close()
            raise
        await self._replace(pc)
        pc.on("connectionstatechange", lambda: self._state(pc, arrived))
        if tracks:
            self._reader = asyncio.create_task(self._read(tracks[0]), name=f"webrtc:{self.session}:in")
        logger.info("answered a %s offer for %s", self.stage, self.session)
        description = pc.localDescription
        assert description is not None
        return str(description.sdp)

    async def _read(self, track: MediaStreamTrack) -> None:
        assert self._receive is not None
        try:
            await self._receive(track)
        except MediaStreamError:
            pass  # the peer hung up
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("reading the peer's audio of %s failed", self.session)

    def _state(self, pc: RTCPeerConnection, arrived: float) -> None:
        if pc is not self._pc:
            return
        state = pc.connectionState
        if state == "connected":
            connect_seconds.labels(self.stage).observe(time.monotonic() - arrived)
        self._on_state(state)

    async def _replace(self, pc: RTCPeerConnection | None) -> None:
        """Make ``pc`` the leg's peer connection; the previous one and its reader are closed."""
        old, reader = self._pc, self._reader
        self._pc, self._reader = pc, None
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if old is not None:
            await old.close()
