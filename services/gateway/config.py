"""Settings of the gateway: where it listens, who may use it, and how sessions it opens are set up."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.livekit.config import LiveKitConfig
from services.runtime.config import ConfigError, setting, settings_class


@settings_class
@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    """The public HTTP API and page; health and metrics stay on VB_HTTP_PORT like every service's."""

    host: str = setting("VB_GATEWAY_HOST", "0.0.0.0", "Address the API and the web page listen on.")
    port: int = setting("VB_GATEWAY_PORT", 8080, "Port of the API and the web page (0: any free port).")
    api_keys: tuple[str, ...] = setting(
        "VB_GATEWAY_API_KEYS",
        (),
        "Keys apps send as `Authorization: Bearer <key>`, comma-separated (or VB_GATEWAY_API_KEYS_FILE). "
        "Empty: no check (local use only). Each session also gets a token valid for it alone, for the "
        "browser.",
    )
    cors_origins: tuple[str, ...] = setting(
        "VB_GATEWAY_CORS_ORIGINS", ("*",), "Origins whose pages may call the API, comma-separated; * for any."
    )
    signal_timeout_s: float = setting(
        "VB_GATEWAY_SIGNAL_TIMEOUT",
        5.0,
        "Seconds a WHIP/WHEP offer waits for the session's ingress/egress owner to answer (it may be "
        "starting, or taking over) before the client gets 503.",
    )
    open_timeout_s: float = setting(
        "VB_GATEWAY_OPEN_TIMEOUT", 10.0, "Seconds opening a session waits for every stage to take it."
    )
    greeting: str = setting(
        "VB_GATEWAY_GREETING",
        "",
        "What the agent says first in sessions the gateway opens (empty: the caller speaks first; the "
        "greeting starts playing before the page's audio is connected, so its first words may be lost).",
    )

    #: Settings of the LiveKit routes (their own LIVEKIT_* / VB_LIVEKIT_* table), loaded in ``main``.
    livekit: LiveKitConfig = field(default_factory=LiveKitConfig)

    def __post_init__(self) -> None:
        if self.signal_timeout_s <= 0 or self.open_timeout_s <= 0:
            raise ConfigError("VB_GATEWAY_SIGNAL_TIMEOUT and VB_GATEWAY_OPEN_TIMEOUT must be positive")
        if not 0 <= self.port <= 65535:
            raise ConfigError("VB_GATEWAY_PORT must be a TCP port")
