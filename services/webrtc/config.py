"""Settings of the WebRTC legs, shared by the ingress (caller's microphone) and the egress (agent's voice)."""

from __future__ import annotations

from dataclasses import dataclass

from services.runtime.config import ConfigError, setting, settings_class


@settings_class
@dataclass(frozen=True, kw_only=True)
class WebRtcConfig:
    """ICE addresses, the caller's jitter buffer, the agent track's queue, when a caller has hung up."""

    host_addresses: tuple[str, ...] = setting(
        "VB_WEBRTC_HOST_ADDRESSES",
        (),
        "Addresses offered as ICE host candidates, comma-separated; default: every interface but "
        "loopback. Set 127.0.0.1 where the browser reaches this replica only over loopback, or the "
        "pod's address in a cluster.",
    )
    jitter_prefetch: int = setting(
        "VB_WEBRTC_JITTER_PREFETCH",
        0,
        "Packets of the caller's audio held before decoding (aiortc's default, 4, adds ~80 ms to every "
        "turn; 0 suits a LAN or a good connection; raise it for jittery networks).",
    )
    out_queue_frames: int = setting(
        "VB_WEBRTC_OUT_QUEUE_FRAMES",
        5,
        "20 ms agent frames the outgoing track may hold; beyond it the oldest are dropped (playout is "
        "paced, so it holds one at most in practice). An interrupt empties it at once.",
    )
    echo_guard_ms: float = setting(
        "VB_WEBRTC_ECHO_GUARD_MS",
        400.0,
        "For this long after the agent starts (or resumes) speaking, the caller's audio counts as "
        "silence, so that its echo, before the browser's echo canceller has locked on, is not taken for "
        "a barge-in. Measured at the ingress from PlayoutStarted: it covers the round trip to the "
        "browser (~150 ms here). 0 turns it off.",
    )
    hangup_s: float = setting(
        "VB_WEBRTC_HANGUP_S",
        20.0,
        "Seconds a session may go without a connected microphone (before the first WHIP offer, or after "
        "the connection failed) before it ends as a hang-up.",
    )

    def __post_init__(self) -> None:
        if not 0 <= self.jitter_prefetch <= 8:
            raise ConfigError("VB_WEBRTC_JITTER_PREFETCH must be between 0 and 8 packets")
        if self.out_queue_frames < 1:
            raise ConfigError("VB_WEBRTC_OUT_QUEUE_FRAMES must be at least 1")
        if self.echo_guard_ms < 0:
            raise ConfigError("VB_WEBRTC_ECHO_GUARD_MS must be 0 or more")
        if self.hangup_s <= 0:
            raise ConfigError("VB_WEBRTC_HANGUP_S must be positive")
