"""Claude through the Anthropic Messages API, streamed token by token under a voice-sized budget.

The SDK is built for batch work (10-minute timeout, retries with waits of any length the server asks
for); a caller waits two seconds at most. So: one SDK retry, and only when the server's retry-after
fits; a ``watchdog`` for the first token and for every gap after it; every failure, including those
the SDK lets through raw (``httpx2`` errors mid-body, an ``event: error`` after the 200), mapped to a
``ProviderError`` the fallback chain understands. The system prompt, the tool definitions and the
newest message carry ``cache_control`` breakpoints, so each turn of a long call reads the whole
conversation before it from the prompt cache. Closing the stream closes the HTTP response: the
server sees the connection go, which is how a barge-in stops generation (and billing).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx2
from anthropic.types import (
    InputJSONDelta,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    ToolUseBlock,
)
from anthropic.types import TextDelta as ApiTextDelta

from services.dialogue.engines.base import (
    LlmDelta,
    LlmEngine,
    LlmRequest,
    TextDelta,
    ToolCall,
    ToolStart,
    Usage,
)
from services.runtime.config import ConfigError, setting, settings_class
from services.runtime.resilience import (
    ProviderError,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    watchdog,
)

PROVIDER = "anthropic"
EPHEMERAL = {"type": "ephemeral"}
#: error types that say the request itself is wrong: another try with the same request fails again
REQUEST_ERRORS = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "permission_error",
        "not_found_error",
        "request_too_large",
    }
)


@settings_class
@dataclass(frozen=True, kw_only=True)
class AnthropicSettings:
    """The Anthropic LLM engine: key, endpoint, model and the time budget of a reply."""

    api_key: str = setting(
        "ANTHROPIC_API_KEY",
        "",
        "Anthropic API key (or a file in ANTHROPIC_API_KEY_FILE); when set, Claude is the LLM.",
    )
    base_url: str = setting("VB_ANTHROPIC_BASE_URL", "https://api.anthropic.com", "Messages API base URL.")
    model: str = setting("VB_ANTHROPIC_MODEL", "claude-haiku-5-5", "Claude model (a fast one, for voice).")
    connect_timeout_s: float = setting("VB_ANTHROPIC_CONNECT_TIMEOUT", 1.0, "Seconds to open a connection.")
    first_token_s: float = setting(
        "VB_ANTHROPIC_FIRST_TOKEN_TIMEOUT", 2.0, "Seconds from request to first token, retries included."
    )
    stall_s: float = setting("VB_ANTHROPIC_STALL_TIMEOUT", 2.0, "Longest silence mid-reply (seconds).")
    max_retries: int = setting("VB_ANTHROPIC_MAX_RETRIES", 1, "SDK retries of a refused or failed request.")
    retry_after_max_s: float = setting(
        "VB_ANTHROPIC_RETRY_AFTER_MAX", 0.5, "Longest retry-after (s) worth waiting for; else fail over."
    )

    def __post_init__(self) -> None:
        if min(self.connect_timeout_s, self.first_token_s, self.stall_s) <= 0:
            raise ConfigError("VB_ANTHROPIC_*_TIMEOUT settings must be positive")
        if self.max_retries < 0 or self.retry_after_max_s < 0:
            raise ConfigError("VB_ANTHROPIC_MAX_RETRIES and _RETRY_AFTER_MAX must not be negative")

    def __repr__(self) -> str:
        # the dataclass repr would print the key into any log line that shows the settings
        return f"AnthropicSettings(model={self.model!r}, base_url={self.base_url!r}, api_key=[secret])"


class AnthropicEngine(LlmEngine):
    """Streams Claude replies; one SDK client (connection pool) shared by every session."""

    name = PROVIDER

    def __init__(self, settings: AnthropicSettings) -> None:
        if not settings.api_key:
            raise ConfigError("ANTHROPIC_API_KEY is not set")
        self.settings = settings
        self._client = anthropic.AsyncAnthropic(
            api_key=settings.api_key,
            base_url=settings.base_url,
            max_retries=settings.max_retries,
            # a backstop only: the watchdog in ``stream`` enforces the real budget
            timeout=anthropic.Timeout(
                settings.first_token_s + settings.stall_s, connect=settings.connect_timeout_s
            ),
            middleware=[RetryAfterBudget(settings.retry_after_max_s)],
        )

    def stream(self, request: LlmRequest) -> AsyncIterator[LlmDelta]:
        """Yield text as it is generated, ToolStart/ToolCall per tool_use block, then Usage."""
        settings = self.settings
        return watchdog(
            self._deltas(request), PROVIDER, first_s=settings.first_token_s, stall_s=settings.stall_s
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.close()

    async def _deltas(self, request: LlmRequest) -> AsyncIterator[LlmDelta]:
        usage: dict[str, int] = {}
        tool: ToolUseBlock | None = None
        tool_json: list[str] = []
        params = request_params(request, self.settings.model)
        try:
            events = await self._client.messages.create(**params, stream=True)
            async with events:  # leaving it (end, error, aclose on barge-in) closes the HTTP response
                async for event in events:
                    match event:
                        case RawMessageStartEvent(message=message):
                            usage = _usage_counts(message.usage.model_dump())
                        case RawContentBlockStartEvent(content_block=ToolUseBlock() as block):
                            tool, tool_json = block, []
                            yield ToolStart(block.name)
                        case RawContentBlockDeltaEvent(delta=ApiTextDelta(text=text)) if text:
                            yield TextDelta(text)
                        case RawContentBlockDeltaEvent(delta=InputJSONDelta(partial_json=part)):
                            tool_json.append(part)
                        case RawContentBlockStopEvent() if tool is not None:
                            yield ToolCall(tool.id, tool.name, _tool_input("".join(tool_json)))
                            tool = None
                        case RawMessageDeltaEvent(usage=delta_usage):
                            # message_delta counts are cumulative; fields it leaves out stay as they were
                            usage |= _usage_counts(delta_usage.model_dump())
        except anthropic.APIStatusError as err:
            raise status_error(err) from err
        except (anthropic.APITimeoutError, httpx2.TimeoutException) as err:
            raise ProviderTimeout(PROVIDER, f"no response in time ({type(err).__name__})") from err
        except (anthropic.APIConnectionError, httpx2.TransportError) as err:
            # httpx2 errors are what the SDK lets through mid-body (a dropped connection)
            raise ProviderUnavailable(PROVIDER, f"connection failed ({type(err).__name__})") from err
        yield Usage(
            input_tokens=usage.get("input_tokens", 0),
            output_tokens=usage.get("output_tokens", 0),
            cache_read_tokens=usage.get("cache_read_input_tokens", 0),
            cache_write_tokens=usage.get("cache_creation_input_tokens", 0),
            engine=PROVIDER,
        )


class RetryAfterBudget(anthropic.Middleware):
    """Fails a retryable response at once when its retry-after is longer than the caller can wait.

    The SDK would sleep as long as the server asks (it has no cap); a voice reply would rather fail
    over to the next engine now.
    """

    def __init__(self, max_wait_s: float) -> None:
        self.max_wait_s = max_wait_s

    async def handle_async(
        self, request: anthropic.APIRequest, call_next: anthropic.AsyncCallNext
    ) -> anthropic.AsyncAPIResponse[Any]:
        """Pass the response on, or raise ProviderUnavailable instead of a long retry-after wait."""
        response = await call_next(request)
        status = response.status_code
        wait = retry_after_s(response.headers)
        if (status == 429 or status >= 500) and wait is not None and wait > self.max_wait_s:
            await response.close()
            raise ProviderUnavailable(
                PROVIDER,
                f"HTTP {status}, retry after {wait:g}s: beyond the budget",
                status=status,
                retry_after_s=wait,
            )
        return response


def request_params(request: LlmRequest, model: str) -> dict[str, Any]:
    """The Messages API body for a request (no sampling parameters: API 2026-10-21 refuses them)."""
    params: dict[str, Any] = {
        "model": model,
        "max_tokens": request.max_tokens,
        "system": [{"type": "text", "text": request.instructions, "cache_control": EPHEMERAL}],
        "messages": conversation(request),
    }
    if request.tools:
        tools = [
            {"name": t.name, "description": t.description, "input_schema": t.input_schema}
            for t in request.tools
        ]
        tools[-1]["cache_control"] = EPHEMERAL
        params["tools"] = tools
    return params


def conversation(request: LlmRequest) -> list[dict[str, Any]]:
    """Messages of the request, with this reply's tool calls and results as content blocks.

    Tool calls made earlier in the reply become one assistant message (after the text the assistant
    had already said, when the conversation ends with it) answered by one user message of
    tool_result blocks. The newest block is a cache breakpoint: the next turn reads all of this from
    the prompt cache.
    """
    messages: list[dict[str, Any]] = [
        {"role": m.role, "content": [{"type": "text", "text": m.text}]}
        for m in request.messages
        if m.text.strip()
    ]
    if request.tool_results:
        said = messages.pop()["content"] if messages and messages[-1]["role"] == "assistant" else []
        uses = [
            {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}
            for call, _ in request.tool_results
        ]
        results = [
            {"type": "tool_result", "tool_use_id": call.id, "content": result}
            for call, result in request.tool_results
        ]
        messages += [{"role": "assistant", "content": said + uses}, {"role": "user", "content": results}]
    if messages:
        messages[-1]["content"][-1]["cache_control"] = EPHEMERAL
    return messages


def status_error(err: anthropic.APIStatusError) -> ProviderError:
    """Classify an API error. Status 200 is an ``event: error`` that arrived mid-stream."""
    status, kind = err.status_code, err.type or "error"
    detail = f"HTTP {status} {kind}" if status != 200 else f"{kind} mid-stream"
    if err.api_message:
        detail += f": {err.api_message[:200]}"
    if kind in REQUEST_ERRORS or (400 <= status < 500 and status not in (408, 409, 429)):
        return ProviderRejected(PROVIDER, detail, status=status)
    return ProviderUnavailable(
        PROVIDER, detail, status=status, retry_after_s=retry_after_s(err.response.headers)
    )


def retry_after_s(headers: httpx2.Headers) -> float | None:
    """The server's requested wait, from ``retry-after-ms`` or ``retry-after`` (seconds)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            return float(headers[name]) * scale
        except (KeyError, ValueError):
            continue
    return None


def _usage_counts(fields: dict[str, Any]) -> dict[str, int]:
    return {k: v for k, v in fields.items() if isinstance(v, int) and k.endswith("tokens")}


def _tool_input(raw: str) -> dict[str, Any]:
    """The tool_use input assembled from its input_json_delta pieces."""
    try:
        value = json.loads(raw) if raw.strip() else {}
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ProviderUnavailable(PROVIDER, "tool_use input is not a JSON object")
    return value
