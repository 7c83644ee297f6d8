"""LiveKit access tokens: the bridge's own participants, and the ones apps hand to their callers.

Every token is scoped to one room. The bridge's participants get only what they use: the listener that
hears the caller is hidden and may only subscribe; the agent may publish its microphone and data
(captions) and set its own attributes (its state), but subscribes to nothing. A token an app hands to a
caller's client is short-lived: it is only needed to join, the server refreshes it afterwards.
"""

from __future__ import annotations

import datetime
from typing import Literal

from livekit import api

from services.livekit.config import LiveKitConfig

#: Lifetime of the bridge's own tokens: a connected participant's token is refreshed by the server, and
#: every (re)join mints a new one.
PARTICIPANT_TTL = datetime.timedelta(minutes=10)
MICROPHONE = "microphone"


def _token(
    cfg: LiveKitConfig,
    identity: str,
    grants: api.VideoGrants,
    ttl: datetime.timedelta,
    *,
    name: str = "",
    kind: Literal["standard", "agent"] = "standard",
) -> str:
    token = api.AccessToken(cfg.api_key, cfg.api_secret).with_identity(identity).with_grants(grants)
    return token.with_name(name or identity).with_kind(kind).with_ttl(ttl).to_jwt()


def listener_token(cfg: LiveKitConfig, room: str, session: str) -> str:
    """The ingress's hidden participant: joins ``room`` unseen and may only subscribe."""
    grants = api.VideoGrants(
        room_join=True, room=room, hidden=True, can_subscribe=True, can_publish=False, can_publish_data=False
    )
    return _token(cfg, cfg.listener_identity(session), grants, PARTICIPANT_TTL)


def agent_token(cfg: LiveKitConfig, room: str, session: str) -> str:
    """The egress's agent participant: publishes its voice and captions, sets its state, hears nothing."""
    grants = api.VideoGrants(
        room_join=True,
        room=room,
        can_subscribe=False,
        can_publish=True,
        can_publish_data=True,
        can_publish_sources=[MICROPHONE],
        can_update_own_metadata=True,
        agent=True,
    )
    return _token(
        cfg, cfg.agent_identity(session), grants, PARTICIPANT_TTL, name=cfg.agent_name, kind="agent"
    )


def caller_token(cfg: LiveKitConfig, room: str, identity: str, name: str, ttl_s: float) -> str:
    """What an app's client joins ``room`` with: speak (microphone), listen, send data."""
    grants = api.VideoGrants(
        room_join=True,
        room=room,
        can_subscribe=True,
        can_publish=True,
        can_publish_data=True,
        can_publish_sources=[MICROPHONE],
    )
    return _token(cfg, identity, grants, datetime.timedelta(seconds=ttl_s), name=name)
