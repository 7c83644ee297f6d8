"""A local Anthropic Messages API that the real SDK is pointed at: ``POST /v1/messages``, streamed.

It speaks the wire protocol of /work/shared/reference/providers.md section 2 (checked against
anthropic 2.12): either auth header, body validation as API version 2026-10-21 does it (including the
400 for ``temperature``/``top_p``/``top_k``), SSE with an ``event:`` line on every event, the body
closed after ``message_stop``, and a prompt cache keyed on the request prefix up to each
``cache_control`` breakpoint. Each request takes the next scripted ``Reply`` (text, a tool_use block,
an error status, or a fault), and leaves an ``Exchange`` record: the body, the retry-count header,
and how the stream ended (``completed``, ``client_closed`` = the client hung up early, ...).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
TOP_LEVEL = {"model", "max_tokens", "stream", "system", "messages", "tools", "tool_choice", "metadata"}
SAMPLING = ("temperature", "top_p", "top_k")
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


@dataclass
class Reply:
    """What the fake answers to one request.

    ``status`` other than 200 answers with that API error instead of a stream. ``fault`` breaks
    the stream after ``fault_after`` text deltas: ``error`` (an ``event: error`` overloaded),
    ``drop`` (the connection closes mid-body), ``stall`` (silence until the client gives up).
    """

    text: str = "Sure, I can help with that. What day suits you?"
    tool: tuple[str, dict[str, Any]] | None = None
    status: int = 200
    retry_after: float | None = None
    first_byte_delay_s: float = 0.0
    token_gap_s: float | None = None  # the pace of this reply's text; None: the fake's
    fault: Literal["error", "drop", "stall"] | None = None
    fault_after: int = 2


@dataclass
class Exchange:
    """One request as the fake saw it, and how its response ended."""

    body: dict[str, Any]
    headers: dict[str, str]
    retry_count: int
    status: int = 200
    usage: dict[str, int] = field(default_factory=dict)
    sent: list[str] = field(default_factory=list)
    #: the fault the fake injected, if any
    fault: str | None = None
    #: the client hung up before the fake had finished answering
    client_closed: bool = False
    #: set when the fake is done with the request (answered, or the client went away)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class BadRequest(Exception):
    """The body breaks a rule the real API enforces; becomes a 400 invalid_request_error."""


def tokens(block: Any) -> int:
    """A rough token count (4 characters a token) — enough to make cache shares visible."""
    return max(1, len(json.dumps(block, sort_keys=True)) // 4)


def split_deltas(text: str) -> list[str]:
    """Text in the pieces a model streams: words with their leading space."""
    return re.findall(r"\s*\S+", text)


class FakeAnthropic:
    """The server; ``async with FakeAnthropic() as fake:`` then point the SDK at ``fake.base_url``."""

    def __init__(self, *, api_key: str = "sk-ant-fake-key", token_gap_s: float = 0.005) -> None:
        self.api_key, self.token_gap_s = api_key, token_gap_s
        self.script: deque[Reply] = deque()
        self.default = Reply()
        #: (regex, reply) answering the request by the last user text, when nothing is queued
        self.rules: list[tuple[re.Pattern[str], Reply]] = []
        self.exchanges: list[Exchange] = []
        self.cached: set[str] = set()
        self._stopping = asyncio.Event()
        self._arrivals = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    def queue(self, *replies: Reply) -> None:
        """Answer the next requests with these, in order (then with ``default``)."""
        self.script.extend(replies)

    async def requested(self, count: int) -> list[Exchange]:
        """Wait until ``count`` requests have come in; the exchanges so far."""
        async with self._arrivals:
            await self._arrivals.wait_for(lambda: len(self.exchanges) >= count)
        return list(self.exchanges)

    async def __aenter__(self) -> FakeAnthropic:
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        # handler_cancellation: a client that hangs up cancels its handler, which is how EOF is seen
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        exchange = Exchange(
            body={}, headers=headers, retry_count=int(headers.get("x-stainless-retry-count", -1))
        )
        self.exchanges.append(exchange)
        async with self._arrivals:
            self._arrivals.notify_all()
        reply = self.script.popleft() if self.script else self._by_rule(raw)
        try:
            return await self._answer(request, raw, exchange, reply)
        except (asyncio.CancelledError, ConnectionResetError):
            # our own "drop" also ends in a cancelled handler; anything else is the client leaving
            exchange.client_closed = exchange.fault != "drop"
            raise
        finally:
            exchange.done.set()

    def answer(self, pattern: str, reply: Reply) -> None:
        """Answer requests whose last user message matches ``pattern`` (case-insensitive) with ``reply``."""
        self.rules.append((re.compile(pattern, re.IGNORECASE), reply))

    def _by_rule(self, raw: bytes) -> Reply:
        try:
            last = json.loads(raw)["messages"][-1]
            content = last["content"]
            blocks = [{"text": content}] if isinstance(content, str) else content
            said = " ".join(b.get("text", "") for b in blocks) if last["role"] == "user" else ""
        except (ValueError, AttributeError, KeyError, TypeError):
            return self.default  # the validation answers a malformed body
        return next((reply for rule, reply in self.rules if rule.search(said)), self.default)

    async def _answer(
        self, request: web.Request, raw: bytes, exchange: Exchange, reply: Reply
    ) -> web.StreamResponse:
        if reply.first_byte_delay_s:
            await asyncio.sleep(reply.first_byte_delay_s)
        auth = exchange.headers.get("x-api-key") or exchange.headers.get("authorization", "").removeprefix(
            "Bearer "
        )
        if auth != self.api_key:
            return self._error(exchange, 401, "invalid x-api-key")
        if reply.status != 200:
            return self._error(exchange, reply.status, "scripted failure", retry_after=reply.retry_after)
        try:
            exchange.body = json.loads(raw)
            validate(exchange.body, exchange.headers)
        except (BadRequest, ValueError) as err:
            return self._error(exchange, 400, str(err))
        exchange.usage = self._cache_usage(exchange.body)
        response = web.StreamResponse(
            headers={"content-type": "text/event-stream", "request-id": f"req_{uuid.uuid4().hex[:12]}"}
        )
        await response.prepare(request)
        await self._stream(request, response, exchange, reply)
        return response

    def _error(
        self, exchange: Exchange, status: int, message: str, *, retry_after: float | None = None
    ) -> web.Response:
        exchange.status = status
        headers = {"request-id": f"req_{uuid.uuid4().hex[:12]}"}
        if retry_after is not None:
            headers["retry-after"] = f"{retry_after:g}"
        body = {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}
        return web.json_response(
            {**body, "request_id": headers["request-id"]}, status=status, headers=headers
        )

    def _cache_usage(self, body: dict[str, Any]) -> dict[str, int]:
        """Prompt-cache accounting: the longest cached prefix is read, the rest up to the last
        breakpoint is written, the remainder is plain input (the API's lookback, without its minimum
        cacheable length)."""
        blocks: list[Any] = [*body.get("tools", [])]
        system = body.get("system", [])
        blocks += [{"type": "text", "text": system}] if isinstance(system, str) else system
        for message in body["messages"]:
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            blocks += [{"role": message["role"], **part} for part in parts]
        keys: list[str] = []
        sizes: list[int] = []
        total = 0
        for block in blocks:
            plain = {k: v for k, v in block.items() if k != "cache_control"}
            total += tokens(plain)
            chain = hashlib.sha256((keys[-1] if keys else "").encode())
            chain.update(json.dumps(plain, sort_keys=True).encode())
            keys.append(chain.hexdigest())
            sizes.append(total)
        marks = [i for i, block in enumerate(blocks) if "cache_control" in block]
        last = marks[-1] if marks else -1
        hit = next((i for i in range(last, -1, -1) if keys[i] in self.cached), -1)
        read = sizes[hit] if hit >= 0 else 0
        write = sizes[last] - read if last >= 0 else 0
        self.cached.update(keys[i] for i in marks)
        return {
            "input_tokens": total - read - write,
            "cache_read_input_tokens": read,
            "cache_creation_input_tokens": write,
        }

    async def _stream(
        self, request: web.Request, response: web.StreamResponse, exchange: Exchange, reply: Reply
    ) -> None:
        async def send(event: str, data: dict[str, Any]) -> None:
            await response.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
            exchange.sent.append(event)

        body = exchange.body
        message = {
            "id": f"msg_{uuid.uuid4().hex[:12]}",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**exchange.usage, "output_tokens": 1},
        }
        await send("message_start", {"type": "message_start", "message": message})
        await send("ping", {"type": "ping"})
        pieces = split_deltas(reply.text)[: body["max_tokens"]]
        stop = "max_tokens" if len(pieces) < len(split_deltas(reply.text)) else "end_turn"
        index = 0
        if pieces:
            await send(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            )
            for n, piece in enumerate(pieces):
                if reply.fault and n == reply.fault_after:
                    await self._fault(request, send, exchange, reply.fault)
                    return
                await asyncio.sleep(self.token_gap_s if reply.token_gap_s is None else reply.token_gap_s)
                delta = {"type": "text_delta", "text": piece}
                await send("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
            await send("content_block_stop", {"type": "content_block_stop", "index": 0})
            index = 1
        if reply.fault and reply.fault_after >= len(pieces):
            await self._fault(request, send, exchange, reply.fault)
            return
        if reply.tool is not None and stop == "end_turn":
            name, arguments = reply.tool
            block = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:20]}", "name": name, "input": {}}
            await send(
                "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}
            )
            encoded = json.dumps(arguments)
            for part in (encoded[: len(encoded) // 2], encoded[len(encoded) // 2 :]):
                delta = {"type": "input_json_delta", "partial_json": part}
                await send(
                    "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
                )
            await send("content_block_stop", {"type": "content_block_stop", "index": index})
            stop = "tool_use"
        output = len(pieces) + (len(json.dumps(reply.tool)) // 4 if reply.tool else 0)
        await send(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": output},
            },
        )
        await send("message_stop", {"type": "message_stop"})
        await response.write_eof()

    async def _fault(self, request: web.Request, send: Any, exchange: Exchange, fault: str) -> None:
        exchange.fault = fault
        if fault == "error":
            await send(
                "error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
            )
            return
        if fault == "drop":
            assert request.transport is not None
            request.transport.close()  # FIN after what was written: the chunked body never ends
        await self._stopping.wait()  # until the connection goes (handler cancelled) or the fake stops


def validate(body: Any, headers: dict[str, str]) -> None:
    """The request rules of API version 2026-10-21 that a client can get wrong."""
    if not headers.get("anthropic-version"):
        raise BadRequest("anthropic-version: header is required")
    if not isinstance(body, dict):
        raise BadRequest("body: must be an object")
    for key in SAMPLING:
        if key in body:
            raise BadRequest(f"{key}: is not supported by this API version; remove it")
    if extra := set(body) - TOP_LEVEL:
        raise BadRequest(f"{sorted(extra)[0]}: Extra inputs are not permitted")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise BadRequest("model: Field required")
    if not isinstance(body.get("max_tokens"), int) or not 1 <= body["max_tokens"] <= 64_000:
        raise BadRequest("max_tokens: must be an integer between 1 and 64000")
    if body.get("stream") is not True:
        raise BadRequest("stream: this fake serves streaming requests only")
    system = body.get("system", [])
    if not isinstance(system, str):
        for block in system:
            _text_block(block, "system")
    names = [_tool(tool) for tool in body.get("tools", [])]
    if len(set(names)) != len(names):
        raise BadRequest("tools: Tool names must be unique")
    _messages(body.get("messages"))
    marks = sum(
        "cache_control" in b for b in [*body.get("tools", []), *([] if isinstance(system, str) else system)]
    )
    for message in body["messages"]:
        if isinstance(message["content"], list):
            marks += sum("cache_control" in b for b in message["content"])
    if marks > 4:
        raise BadRequest("A maximum of 4 blocks with cache_control may be provided")


def _cache_control(block: dict[str, Any], where: str) -> None:
    if "cache_control" in block and block["cache_control"] != {"type": "ephemeral"}:
        raise BadRequest(f"{where}.cache_control: must be {{'type': 'ephemeral'}}")


def _text_block(block: Any, where: str) -> None:
    if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
        raise BadRequest(f"{where}: expected a text block")
    if not block["text"]:
        raise BadRequest(f"{where}: text content blocks must be non-empty")
    _cache_control(block, where)


def _tool(tool: Any) -> str:
    if not isinstance(tool, dict) or not TOOL_NAME.match(str(tool.get("name", ""))):
        raise BadRequest("tools.name: String should match pattern '^[a-zA-Z0-9_-]{1,64}$'")
    schema = tool.get("input_schema")
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise BadRequest(f"tools.{tool['name']}.input_schema: type must be 'object'")
    if not isinstance(tool.get("description", ""), str):
        raise BadRequest(f"tools.{tool['name']}.description: must be a string")
    _cache_control(tool, f"tools.{tool['name']}")
    return str(tool["name"])


def _messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: at least one message is required")
    pending: set[str] = set()  # tool_use ids the next user message must answer
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise BadRequest(f"{where}.role: must be 'user' or 'assistant'")
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list) or not blocks:
            raise BadRequest(f"{where}.content: must be a string or a non-empty list of blocks")
        answered = set()
        for block in blocks:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                _text_block(block, f"{where}.content")
            elif kind == "tool_use" and message["role"] == "assistant":
                if not isinstance(block.get("input"), dict) or not block.get("id") or not block.get("name"):
                    raise BadRequest(f"{where}.content: tool_use needs id, name and an input object")
                pending.add(block["id"])
            elif kind == "tool_result" and message["role"] == "user":
                answered.add(block.get("tool_use_id"))
                _cache_control(block, f"{where}.content")
            else:
                raise BadRequest(
                    f"{where}.content: unexpected block type {kind!r} in a {message['role']} message"
                )
        if message["role"] == "user":
            if pending - answered or answered - pending:
                raise BadRequest(
                    f"{where}: tool_use ids were found without tool_result blocks immediately after, "
                    "or tool_result blocks answer no tool_use"
                )
            pending = set()
    if pending:
        raise BadRequest("messages: the last assistant message has tool_use blocks without tool_result")
