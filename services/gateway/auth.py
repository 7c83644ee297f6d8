"""Who may use the gateway: apps hold an API key; a browser holds a token valid for one session only.

The session token is an HMAC of the session id under the API key that opened it, so any gateway
replica can check it with no shared state, and a page never needs the app's key.
"""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web

TOKEN_CHARS = 32


def session_token(key: str, session: str) -> str:
    """The token that grants access to ``session`` (and nothing else)."""
    return hmac.new(key.encode(), session.encode(), hashlib.sha256).hexdigest()[:TOKEN_CHARS]


def presented(request: web.Request) -> str:
    """The credential of a request: a Bearer header, or ``?token=`` (EventSource cannot set headers)."""
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.query.get("token", "")


class Keys:
    """The configured API keys; with none, every request is allowed (local use)."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys

    @property
    def open(self) -> bool:
        """No keys configured: nothing is checked."""
        return not self.keys

    def app_key(self, request: web.Request) -> str:
        """The API key the request presents; raises 401 if it has none that is valid."""
        if self.open:
            return ""
        given = presented(request)
        for key in self.keys:
            if _same(given, key):
                return key
        raise web.HTTPUnauthorized(text="an API key is required (Authorization: Bearer <key>)")

    def check_session(self, request: web.Request, session: str) -> None:
        """Allow an API key or the session's own token; raise 401 otherwise."""
        if self.open:
            return
        given = presented(request)
        for key in self.keys:
            if _same(given, key) or _same(given, session_token(key, session)):
                return
        raise web.HTTPUnauthorized(text="this session needs its token or an API key")


def _same(given: str, expected: str) -> bool:
    """Constant-time comparison (of bytes: a header may hold any characters)."""
    return hmac.compare_digest(given.encode(), expected.encode())
