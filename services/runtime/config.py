"""Configuration from environment variables, declared once and documented from the declarations.

Every setting is a field of a frozen dataclass with ``setting(env, default, doc)`` metadata. The
environment is read only at a service's entry point (``load``); the rest of the code receives the
typed object. ``voicebus config --markdown`` renders the one table of every setting in docs/.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

T = TypeVar("T")

_REGISTRY: list[type[Any]] = []


def setting(env: str, default: Any, doc: str) -> Any:
    """A dataclass field read from ``env``; ``doc`` goes into the configuration table."""
    return field(default=default, metadata={"env": env, "doc": doc})


def settings_class(cls: type[T]) -> type[T]:
    """Register a frozen settings dataclass so the configuration table lists it."""
    _REGISTRY.append(cls)
    return cls


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


def _parse(raw: str, kind: Any, env: str) -> Any:
    try:
        if kind is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is Path:
            return Path(raw)
        if kind == tuple[str, ...]:
            return tuple(p.strip() for p in raw.split(",") if p.strip())
        return raw
    except ValueError:
        raise ConfigError(f"{env}={raw!r} is not a valid {getattr(kind, '__name__', kind)}") from None


def load(cls: type[T], environ: Mapping[str, str] | None = None, **overrides: Any) -> T:
    """Build ``cls`` from the environment; keyword overrides win (tests, CLI flags).

    ``<VAR>_FILE`` names a file holding the value (Kubernetes and Docker secrets), used when ``<VAR>``
    itself is not set.
    """
    env = os.environ if environ is None else environ
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = f.metadata.get("env")
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif name and name in env:
            values[f.name] = _parse(env[name], hints[f.name], name)
        elif name and f"{name}_FILE" in env:
            raw = Path(env[f"{name}_FILE"]).read_text().strip()
            values[f.name] = _parse(raw, hints[f.name], f"{name}_FILE")
    return cls(**values)


def markdown_table() -> str:
    """The configuration reference: one row per environment variable of every settings class."""
    rows = ["| variable | default | used by | meaning |", "|---|---|---|---|"]
    for cls in sorted(_REGISTRY, key=lambda c: c.__module__):
        owner = cls.__module__.removeprefix("services.").split(".")[0]
        for f in dataclasses.fields(cls):
            if "env" not in f.metadata:
                continue
            default = f.default if f.default is not dataclasses.MISSING else ""
            if isinstance(default, tuple):
                default = ",".join(default)
            rows.append(f"| `{f.metadata['env']}` | `{default}` | {owner} | {f.metadata['doc']} |")
    return "\n".join(rows) + "\n"


def default_replica_id() -> str:
    """Pod name in Kubernetes (HOSTNAME), else host and a short random suffix."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


@settings_class
@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """Settings every service shares: bus, ownership, HTTP, telemetry."""

    nats_url: str = setting("VB_NATS_URL", "nats://127.0.0.1:4222", "NATS server URL(s), comma-separated.")
    nats_user: str = setting("VB_NATS_USER", "", "NATS user (per-service users in deployments).")
    nats_password: str = setting(
        "VB_NATS_PASSWORD", "", "NATS password of VB_NATS_USER (or VB_NATS_PASSWORD_FILE: a file holding it)."
    )
    nats_tls_ca: str = setting("VB_NATS_TLS_CA", "", "CA bundle to verify the NATS server's TLS certificate.")
    replica: str = setting("VB_REPLICA_ID", "", "This replica's id; default: HOSTNAME plus a random suffix.")
    http_host: str = setting("VB_HTTP_HOST", "0.0.0.0", "Address of the health and metrics HTTP server.")
    http_port: int = setting("VB_HTTP_PORT", 0, "Port of /healthz, /readyz and /metrics (0: any free port).")
    lease_ttl_s: float = setting(
        "VB_LEASE_TTL", 1.0, "Seconds without a heartbeat after which a replica's sessions are taken over."
    )
    heartbeat_s: float = setting("VB_HEARTBEAT", 0.25, "Seconds between a replica's lease heartbeats.")
    max_sessions: int = setting(
        "VB_MAX_SESSIONS", 200, "Sessions one replica holds at most; beyond it, it stops taking claims."
    )
    drain_timeout_s: float = setting(
        "VB_DRAIN_TIMEOUT", 20.0, "Seconds SIGTERM waits for turns in flight before handing sessions over."
    )
    events_max_age_s: float = setting(
        "VB_EVENTS_MAX_AGE", 86_400.0, "How long the events stream keeps recorded sessions (seconds)."
    )
    events_max_bytes: int = setting(
        "VB_EVENTS_MAX_BYTES", 8 * 1024**3, "Size cap of the events stream; the oldest events go first."
    )
    trace_exporter: str = setting("VB_TRACE_EXPORTER", "none", "Where spans go: otlp, file, console or none.")
    trace_file: str = setting("VB_TRACE_FILE", "out/traces.jsonl", "File the file exporter appends spans to.")
    otlp_endpoint: str = setting(
        "OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318", "OTLP/HTTP collector (Jaeger) endpoint."
    )
    log_level: str = setting("VB_LOG_LEVEL", "INFO", "Log level of the JSON logs on stderr.")
    redact_pii: bool = setting(
        "VB_REDACT_PII", True, "Mask card numbers, phone numbers and emails in logs and spans."
    )
    queue_frames: int = setting(
        "VB_QUEUE_FRAMES", 250, "Bound of each session's inbound queue (frames; 250 = 5 s of audio)."
    )

    def __post_init__(self) -> None:
        if self.heartbeat_s <= 0 or self.lease_ttl_s < 2 * self.heartbeat_s:
            raise ConfigError("VB_LEASE_TTL must be at least twice VB_HEARTBEAT, both positive")
        if self.trace_exporter not in ("otlp", "file", "console", "none"):
            raise ConfigError(f"VB_TRACE_EXPORTER={self.trace_exporter!r}: use otlp, file, console or none")
        if self.max_sessions < 1:
            raise ConfigError("VB_MAX_SESSIONS must be at least 1")

    def replica_id(self) -> str:
        """The configured replica id or a generated one."""
        return self.replica or default_replica_id()
