"""Settings of the LiveKit edge: the server and its credentials, who we are in a room, how long to wait."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from services.runtime.config import ConfigError, setting, settings_class


@settings_class
@dataclass(frozen=True, kw_only=True)
class LiveKitConfig:
    """Shared by the ingress (the caller's track), the egress (the agent's voice) and the gateway."""

    url: str = setting(
        "LIVEKIT_URL", "", "LiveKit server URL (wss://... or ws://...); empty: no LiveKit edge."
    )
    api_key: str = setting("LIVEKIT_API_KEY", "", "LiveKit API key (names the secret that signs tokens).")
    api_secret: str = setting(
        "LIVEKIT_API_SECRET", "", "LiveKit API secret (or LIVEKIT_API_SECRET_FILE: a file holding it)."
    )
    identity_prefix: str = setting(
        "VB_LIVEKIT_IDENTITY_PREFIX",
        "voicebus",
        "Start of the identities the bridge joins rooms with (<prefix>-agent-<session>, "
        "<prefix>-listener-<session>); a participant whose identity starts with it is never a caller.",
    )
    agent_name: str = setting("VB_LIVEKIT_AGENT_NAME", "Agent", "Display name of the agent participant.")
    token_ttl_s: float = setting(
        "VB_LIVEKIT_TOKEN_TTL", 300.0, "Lifetime of the access tokens the gateway issues to apps (seconds)."
    )
    token_max_ttl_s: float = setting(
        "VB_LIVEKIT_TOKEN_MAX_TTL",
        3600.0,
        "Longest lifetime an app may ask for in a token request (seconds).",
    )
    join_timeout_s: float = setting(
        "VB_LIVEKIT_JOIN_TIMEOUT",
        5.0,
        "Seconds a signalling connection attempt may take when joining a room (the egress also waits up to "
        "this for the agent to be in the room before the session starts).",
    )
    rejoin_s: float = setting(
        "VB_LIVEKIT_REJOIN_S",
        30.0,
        "Seconds the bridge keeps trying to (re)join a room it could not reach or dropped out of (after the "
        "SDK's own reconnects gave up) before the session ends as an error.",
    )
    caller_timeout_s: float = setting(
        "VB_LIVEKIT_CALLER_TIMEOUT",
        60.0,
        "Seconds a session waits in the room for the caller's microphone before it ends (inactivity).",
    )
    queue_ms: int = setting(
        "VB_LIVEKIT_QUEUE_MS",
        100,
        "Audio the agent's track may hold (ms). Playout is paced, so it holds a frame or two; small, so "
        "that an interrupt has little to drop and nothing queued plays after a barge-in.",
    )
    auto_dispatch: tuple[str, ...] = setting(
        "VB_LIVEKIT_AUTO_DISPATCH",
        (),
        "Rooms the agent joins by itself when LiveKit's webhook says they started or a caller joined: "
        "names or shell patterns (support-*), comma-separated.",
    )

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("ws://", "wss://", "http://", "https://")):
            raise ConfigError("LIVEKIT_URL must be a ws://, wss://, http:// or https:// URL")
        if self.url and not (self.api_key and self.api_secret):
            raise ConfigError("LIVEKIT_URL is set: LIVEKIT_API_KEY and LIVEKIT_API_SECRET are needed too")
        if not 0 < self.token_ttl_s <= self.token_max_ttl_s:
            raise ConfigError("VB_LIVEKIT_TOKEN_TTL must be positive and at most VB_LIVEKIT_TOKEN_MAX_TTL")
        if self.join_timeout_s <= 0 or self.rejoin_s < 0 or self.caller_timeout_s <= 0:
            raise ConfigError("VB_LIVEKIT_JOIN_TIMEOUT and _CALLER_TIMEOUT must be positive, _REJOIN_S >= 0")
        if not 20 <= self.queue_ms <= 1000:
            raise ConfigError("VB_LIVEKIT_QUEUE_MS must be between 20 and 1000")

    def __repr__(self) -> str:
        """Everything but the secret (a config object may end up in a log line)."""
        return f"LiveKitConfig(url={self.url!r}, api_key={self.api_key!r}, api_secret='***')"

    @property
    def configured(self) -> bool:
        """Whether a LiveKit server is set up."""
        return bool(self.url)

    def agent_identity(self, session: str) -> str:
        """The agent's identity in the session's room (a successor replica joins as the same one)."""
        return f"{self.identity_prefix}-agent-{session}"

    def listener_identity(self, session: str) -> str:
        """The hidden participant that hears the caller for the session's ingress."""
        return f"{self.identity_prefix}-listener-{session}"

    def ours(self, identity: str) -> bool:
        """Whether a participant is one of the bridge's own."""
        return identity.startswith(f"{self.identity_prefix}-")

    def auto_dispatched(self, room: str) -> bool:
        """Whether the agent joins ``room`` on its own."""
        return any(fnmatch.fnmatchcase(room, pattern) for pattern in self.auto_dispatch)
