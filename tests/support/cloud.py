"""The three provider fakes served from a thread of their own, for whole-stack tests of the cloud engines.

The stage processes reach the fakes over 127.0.0.1, like the real providers over the internet. The
fakes run on their own event loop, so their connection handlers are not the test's tasks; a test
reads their records, and waits on their conditions through ``call``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.deepgram import FakeDeepgram, Utterance
from tests.fakes.elevenlabs import FakeElevenLabs

T = TypeVar("T")

#: keys shaped like real ones, so a leak is found by searching the captured output for them
DEEPGRAM_KEY = f"dg{uuid.uuid4().hex}"
ANTHROPIC_KEY = f"sk-ant-api03-{uuid.uuid4().hex}"
ELEVENLABS_KEY = f"sk_{uuid.uuid4().hex}"
KEYS = (DEEPGRAM_KEY, ANTHROPIC_KEY, ELEVENLABS_KEY)


class CloudFakes:
    """Deepgram, Anthropic and ElevenLabs fakes on a background loop; ``env()`` points the stages at them."""

    def __init__(self, utterances: list[str]) -> None:
        self._utterances = utterances
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="cloud-fakes", daemon=True)
        self._stack = contextlib.AsyncExitStack()
        self.deepgram: FakeDeepgram
        self.anthropic: FakeAnthropic
        self.elevenlabs: FakeElevenLabs

    def __enter__(self) -> CloudFakes:
        self._thread.start()
        self.run(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.run(self._stack.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    async def _start(self) -> None:
        # word_s: recorded speech has pauses; every word is heard well within a turn's speech
        script = [Utterance(text, word_s=0.08) for text in self._utterances]
        self.deepgram = await self._stack.enter_async_context(
            FakeDeepgram(api_key=DEEPGRAM_KEY, script=script, turn_gap_s=1.5, interim_s=0.3)
        )
        self.anthropic = await self._stack.enter_async_context(FakeAnthropic(api_key=ANTHROPIC_KEY))
        self.elevenlabs = await self._stack.enter_async_context(FakeElevenLabs(ELEVENLABS_KEY))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the fakes' loop from a thread that has no loop running (fixtures)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def call(self, coro: Coroutine[Any, Any, T]) -> Awaitable[T]:
        """Run ``coro`` on the fakes' loop; await the result from the test's loop."""
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def env(self) -> dict[str, str]:
        """Stage settings: the cloud engines, alone (a fallback would hide their failures), at the fakes."""
        return {
            "DEEPGRAM_API_KEY": DEEPGRAM_KEY,
            "VB_DEEPGRAM_URL": self.deepgram.url,
            "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
            "VB_ANTHROPIC_BASE_URL": self.anthropic.base_url,
            "ELEVENLABS_API_KEY": ELEVENLABS_KEY,
            "VB_ELEVENLABS_URL": self.elevenlabs.url,
            "VB_STT_FALLBACK": "none",
            "VB_LLM_FALLBACK": "none",
            "VB_TTS_FALLBACK": "none",
        }
