"""Preemptive generation: the LLM starts on a final transcript while endpointing still waits.

The STT sends a segment's final transcript before it decides that the turn is over (it waits for
more speech first). The dialogue starts the reply's LLM stream on the turn's text so far and buffers
what it writes. When the turn ends with the same text, the reply takes the buffered stream and the
LLM's first-token time is already (partly) behind it; when the caller goes on speaking or the text
differs, the stream is cancelled (the provider connection closed) and nothing of it was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import Counter

from services.dialogue.engines.base import LlmDelta
from services.runtime.service import SessionContext

preemptions = Counter(
    "vb_llm_preemptive_total",
    "Replies started before the end of the turn, by outcome: used, cancelled",
    ["outcome"],
)


def same_text(a: str, b: str) -> bool:
    """Whether two transcripts of a turn say the same (whitespace aside)."""
    return a.split() == b.split()


class Prefetch:
    """An LLM stream started for ``turn`` on ``text``, read ahead into a buffer until it is decided."""

    def __init__(
        self, ctx: SessionContext[Any], turn: int, text: str, stream: AsyncIterator[LlmDelta]
    ) -> None:
        self.turn, self.text = turn, text
        self._buffer: asyncio.Queue[LlmDelta | Exception | None] = asyncio.Queue()
        self._stopped = False
        self._task = ctx.spawn(self._pump(stream), f"preempt:{turn}")

    async def _pump(self, stream: AsyncIterator[LlmDelta]) -> None:
        try:
            async for delta in stream:
                if self._stopped:  # the task's cancel can be lost in the engine's wait_for (Python 3.11)
                    return
                self._buffer.put_nowait(delta)
            self._buffer.put_nowait(None)
        except Exception as e:  # handed to the reply, which reports it as it would its own
            self._buffer.put_nowait(e)
        finally:
            if (aclose := getattr(stream, "aclose", None)) is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def deltas(self) -> AsyncIterator[LlmDelta]:
        """The stream from its first delta; closing it stops the LLM."""
        preemptions.labels("used").inc()
        try:
            while (item := await self._buffer.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            await self._stop()

    async def cancel(self) -> None:
        """The turn went another way: stop the LLM, drop what it wrote."""
        preemptions.labels("cancelled").inc()
        await self._stop()

    async def _stop(self) -> None:
        self._stopped = True
        self._task.cancel()
        await asyncio.wait({self._task})
