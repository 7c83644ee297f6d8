"""Messages and records outside a session's event stream: claims, ownership, replica leases.

Ownership works without per-message TTLs (nats-server 2.9): each replica keeps one lease in the
replicas bucket alive with heartbeats; a session's owner record names the replica that holds it and
the claim's epoch. Peers watch the leases; when a holder's heartbeats stop for the lease time, they
race to rewrite its owner records with a compare-and-set on the record's revision, so exactly one wins.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from proto.events import SessionId, SessionSpec


class SystemMessage(msgspec.Struct, kw_only=True, frozen=True):
    """Base of messages and records outside a session's event stream."""


class ClaimRequest(SystemMessage, kw_only=True, frozen=True):
    """Sent to a stage's queue group: one replica should take the session."""

    spec: SessionSpec


class ClaimReply(SystemMessage, kw_only=True, frozen=True):
    """The replica that took (or already held) the session, and the claim's epoch."""

    session: SessionId
    stage: str
    replica: str
    epoch: Annotated[int, Meta(ge=0)]
    ok: bool = True
    reason: str = ""


class OwnerRecord(SystemMessage, kw_only=True, frozen=True):
    """Who holds a session for one stage. ``replica`` is empty while the session is being handed over."""

    session: SessionId
    stage: str
    replica: str
    epoch: Annotated[int, Meta(ge=0)]
    claimed_ts: Annotated[int, Meta(ge=0)]


class ReplicaLease(SystemMessage, kw_only=True, frozen=True):
    """A replica's heartbeat: while it keeps arriving, the replica holds its sessions."""

    stage: str
    replica: str
    host: str
    pid: int
    started_ts: Annotated[int, Meta(ge=0)]
    beat_ts: Annotated[int, Meta(ge=0)]
    sessions: Annotated[int, Meta(ge=0)] = 0
    draining: bool = False


class Checkpoint(SystemMessage, kw_only=True, frozen=True):
    """A stage's saved state for a session, and how far into the session's events it reflects.

    A replica taking the session over restores ``state`` (msgpack of the stage's own state record in
    ``proto.state``) and resumes each feed after its cursor: the stream sequence of the last event it
    reflects, keyed by feed (``events`` for the conversation channels, else the media channel's name).
    """

    session: SessionId
    stage: str
    epoch: Annotated[int, Meta(ge=0)]
    cursors: dict[str, Annotated[int, Meta(ge=0)]] = {}
    state: bytes = b""
    saved_ts: Annotated[int, Meta(ge=0)] = 0


#: Largest SDP accepted in signalling (browser offers are 2-8 KB).
MAX_SDP = 64 * 1024
Sdp = Annotated[str, Meta(max_length=MAX_SDP)]


class SdpOffer(SystemMessage, kw_only=True, frozen=True):
    """A WebRTC peer's complete SDP offer (ICE gathered, no trickle) for one media leg of a session.

    WHIP (the caller's microphone) goes to the session's ingress owner, WHEP (the agent's voice) to its
    egress owner: the peer connection lives in the replica that serves that side of the session.
    """

    session: SessionId
    sdp: Sdp


class SdpAnswer(SystemMessage, kw_only=True, frozen=True):
    """The owning replica's SDP answer (its ICE candidates included), or why it refused the offer."""

    session: SessionId
    sdp: Sdp = ""
    ok: bool = True
    #: ``bad_sdp``: the offer cannot be answered (not SDP, no audio, no common codec); ``not_served``:
    #: the replica does not serve this session with a WebRTC edge; ``internal``: it failed.
    error: Literal["", "bad_sdp", "not_served", "internal"] = ""
    reason: str = ""
    replica: str = ""
