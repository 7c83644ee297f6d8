"""flite: the light fallback voice (Debian ``flite``), one subprocess per chunk, 16 kHz.

Starting a process per chunk costs a few milliseconds and keeps nothing in memory between replies;
a cancelled reply kills its process.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
import subprocess
import wave
from collections.abc import AsyncGenerator
from pathlib import Path

from services.runtime.config import ConfigError
from services.runtime.resilience import ProviderError, ProviderUnavailable
from services.tts.config import TtsConfig
from services.tts.engines.base import TtsEngine, TtsStream
from services.tts.engines.chunked import ChunkedStream, Spoken, speakable


class FliteEngine(TtsEngine):
    """The flite binary with one voice."""

    name = "flite"

    def __init__(self, binary: str, voice: str, stall_s: float = 5.0) -> None:
        self.binary, self.voice, self.stall_s = binary, voice, stall_s

    @classmethod
    def load(cls, voice: str, stall_s: float = 5.0, binary: str = "flite") -> FliteEngine:
        """Find the binary and check that it has ``voice`` (a built-in name or a .flitevox file)."""
        path = shutil.which(binary)
        if path is None:
            raise ProviderUnavailable(
                "flite", f"{binary} is not installed (Debian flite; deploy/dev-setup.sh)"
            )
        if not Path(voice).is_file():
            listing = subprocess.run([path, "-lv"], capture_output=True, text=True, check=True).stdout
            if voice not in listing.split(":", 1)[-1].split():
                raise ConfigError(
                    f"VB_TTS_FLITE_VOICE={voice!r}: flite has no such voice ({listing.strip()})"
                )
        return cls(path, voice, stall_s)

    async def open(self, session: str, reply_id: str, voice: str = "") -> TtsStream:
        """A stream for one reply (``voice`` is ignored: the configured flite voice speaks)."""
        return ChunkedStream(self.name, self.speak, self.stall_s)

    async def speak(self, text: str, received: float) -> AsyncGenerator[Spoken, None]:
        """The whole chunk in one piece (flite takes milliseconds for a sentence)."""
        if speakable(text):
            pcm, rate = await self.synthesize(text)
            yield Spoken(text, pcm, rate)

    async def synthesize(self, text: str) -> tuple[bytes, int]:
        """Mono s16le audio of ``text`` and its rate."""
        proc = await asyncio.create_subprocess_exec(
            self.binary,
            "-voice",
            self.voice,
            "-t",
            text,
            "-o",
            "/dev/stdout",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await proc.communicate()
        finally:
            if proc.returncode is None:  # cancelled: do not leave it running
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if proc.returncode != 0:
            message = f"exited with {proc.returncode}: {err.decode(errors='replace')[:200]}"
            raise ProviderError(self.name, message, retryable=False)
        try:
            with wave.open(io.BytesIO(out)) as wav:
                if wav.getsampwidth() != 2 or wav.getnchannels() != 1:
                    raise ProviderError(self.name, "wrote audio that is not mono 16-bit", retryable=False)
                return wav.readframes(wav.getnframes()), wav.getframerate()
        except (wave.Error, EOFError) as e:
            raise ProviderError(self.name, f"wrote no usable WAV: {e}", retryable=False) from e


def load(cfg: TtsConfig) -> FliteEngine:
    """The flite engine with the configured voice."""
    return FliteEngine.load(cfg.flite_voice, cfg.stall_s)
