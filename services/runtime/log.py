"""Structured JSON logs that carry the session and turn being served, with caller PII masked.

A task serving a session sets ``session_var``/``turn_var``; every record logged from that task (and
the tasks it spawns) carries them. Messages and string fields pass through ``redact`` before they are
written, so a transcript logged by mistake does not leak a card number.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from contextvars import ContextVar
from typing import Any

session_var: ContextVar[str] = ContextVar("vb_session", default="")
turn_var: ContextVar[int] = ContextVar("vb_turn", default=-1)

_CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
#: not an IPv4 address (an endpoint in a log line is not a phone number)
_PHONE = re.compile(r"(?<![\w+.])(?!\d{1,3}(?:\.\d{1,3}){3}\b)\+?\d[\d ().-]{7,}\d\b")
_SECRET = re.compile(
    r"(?i)\b(authorization|xi-api-key|x-api-key|api[_-]?key|token|bearer|password)(\W{1,3})([^\s'\",}]{6,})"
)

_redact_enabled = True


def redact(text: str) -> str:
    """Mask secrets always, and card numbers, emails and phone numbers unless PII redaction is off."""
    text = _SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}[secret]", text)
    if not _redact_enabled:
        return text
    text = _CARD.sub("[card]", text)
    text = _EMAIL.sub("[email]", text)
    return _PHONE.sub("[phone]", text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, session, turn and any ``extra``."""

    _skip = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        """Render the record as a JSON line, redacted."""
        out: dict[str, Any] = {
            "t": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        if session := session_var.get():
            out["session"] = session
        if (turn := turn_var.get()) >= 0:
            out["turn"] = turn
        for key, value in record.__dict__.items():
            if key not in self._skip and not key.startswith("_"):
                out[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


def setup(level: str = "INFO", *, redact_pii: bool = True, stream: Any = None) -> None:
    """Send every logger's records as JSON lines to stderr (or ``stream``)."""
    global _redact_enabled
    _redact_enabled = redact_pii
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.Formatter.converter = time.gmtime
    for noisy in ("nats", "aiohttp.access", "opentelemetry"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
