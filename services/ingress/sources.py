"""Where a session's caller audio comes from: the ``CallerSource`` interface, the bus and file sources.

A source hands 16 kHz mono samples to the session's stream as they arrive (``deliver``); framing, VAD,
publishing and checkpoints are the same for every source. Another edge (a LiveKit room, a WHIP peer)
is one more ``CallerSource`` in ``SOURCES``: it converts what it receives with ``audio.Resampler``
and calls ``deliver``, from ``on_media`` if its audio comes over the bus or from a task it spawns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from proto import events as ev
from proto import subjects as sj
from proto.state import SourcePosition
from services.ingress.audio import FRAME_SAMPLES, PCM, Resampler, Samples, WavError, read_wav
from services.ingress.config import IngressConfig
from services.runtime.service import SessionContext

logger = logging.getLogger("voicebus.ingress")

#: Caller audio older than this when it reaches the ingress is a backlog (a successor catching up from
#: the recording, a replay faster than real time): its VAD windows are not held to be run with others.
BACKLOG_NS = 100_000_000


class Deliver(Protocol):
    """Hands samples to the session's stream.

    16 kHz mono samples, their wall-clock arrival (ns), whether they end the stream, and whether they
    are ``behind`` (a backlog to catch up on).
    """

    def __call__(
        self, samples: Samples, arrived_ns: int, last: bool, *, behind: bool = False
    ) -> Awaitable[None]: ...


class CallerSource:
    """One session's caller audio. Override what the source needs."""

    #: Bus channels the source consumes; the worker follows them and passes their events to ``on_media``.
    media: tuple[sj.Channel, ...] = ()

    def __init__(self, ctx: SessionContext[Any], cfg: IngressConfig, deliver: Deliver) -> None:
        self.ctx, self.cfg, self.deliver = ctx, cfg, deliver

    @property
    def position(self) -> SourcePosition:
        """Where a successor should resume; live sources cannot seek and keep the default."""
        return SourcePosition()

    async def start(self, position: SourcePosition) -> None:
        """Begin delivering: when the session starts, or at ``position`` after a takeover."""

    async def on_media(self, event: ev.Event) -> None:
        """An event of one of the ``media`` channels, in stream order."""

    async def on_event(self, event: ev.Event) -> None:
        """A conversation event of the session (the agent's playout, say), in stream order."""

    async def close(self) -> None:
        """Stop delivering (the session ended or is handed over)."""


class BusSource(CallerSource):
    """``CallerAudio`` on the session's ``media.in``: any rate from 8 to 48 kHz, mono or stereo, any size."""

    media = (sj.MEDIA_IN,)

    def __init__(self, ctx: SessionContext[Any], cfg: IngressConfig, deliver: Deliver) -> None:
        super().__init__(ctx, cfg, deliver)
        self._resampler = Resampler(cfg.resample_quality)

    async def on_media(self, event: ev.Event) -> None:
        """Resample the chunk (the resampler keeps its state across chunks) and deliver it.

        A chunk stamped by the edge more than ``BACKLOG_NS`` ago is behind (edge and ingress clocks
        are assumed in sync to well within that).
        """
        match event:
            case ev.CallerAudio(pcm=pcm, sample_rate=rate, channels=channels, last=last, ts=sent_ns):
                arrived_ns = time.time_ns()
                samples = self._resampler.push(pcm, rate, channels, last=last)
                await self.deliver(samples, arrived_ns, last, behind=arrived_ns - sent_ns > BACKLOG_NS)


class FileSource(CallerSource):
    """A WAV file (``spec.source_uri``) paced in real time x ``spec.speed``, then silence until the tail ends.

    Frame ``i`` is due at ``t0 + i * 20 ms / speed``: an absolute schedule, so a slow frame does not
    delay the ones after it, and a successor that takes over late catches up to where the caller is.
    The silence after the file lets the VAD close the last segment and the agent's reply play; after
    ``VB_INGRESS_FILE_TAIL`` seconds of it (stream time) the session ends as completed.
    """

    def __init__(self, ctx: SessionContext[Any], cfg: IngressConfig, deliver: Deliver) -> None:
        super().__init__(ctx, cfg, deliver)
        self._position = SourcePosition()
        self._task: asyncio.Task[None] | None = None

    @property
    def position(self) -> SourcePosition:
        """Frames of the file (and its tail) delivered, and the schedule's start."""
        return self._position

    async def start(self, position: SourcePosition) -> None:
        """Read the file and play it from ``position``; an unreadable file is reported, not fatal."""
        path = Path(self.ctx.spec.source_uri)
        try:
            audio = await asyncio.to_thread(read_wav, path)
        except WavError as e:
            logger.warning("file source refused: %s", e)
            await self.ctx.report("malformed", f"file source: {e}")
            return
        logger.info("playing %s from frame %d", path, position.frame)
        self._task = self.ctx.spawn(self._play(audio, position), "file")

    async def _play(self, audio: Samples, position: SourcePosition) -> None:
        file_frames = len(audio) // FRAME_SAMPLES
        total = file_frames + round(self.cfg.file_tail_s * 1000 / ev.FRAME_MS)
        period_ns = ev.FRAME_MS * 1_000_000 / self.ctx.spec.speed
        t0 = position.t0_ns or time.time_ns()
        silence = np.zeros(FRAME_SAMPLES, PCM)
        for i in range(position.frame, total):
            due_ns = t0 + i * period_ns
            # sleeping even when late yields to the loop while a successor catches up
            await asyncio.sleep(max(0.0, (due_ns - time.time_ns()) / 1e9))
            frame = audio[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES] if i < file_frames else silence
            self._position = SourcePosition(frame=i + 1, t0_ns=t0)
            now = time.time_ns()
            try:
                await self.deliver(frame, now, False, behind=now - due_ns > BACKLOG_NS)
            except Exception as e:  # one frame's failure (a bus outage) must not stop the call's audio
                logger.exception("file frame %d failed", i)
                await self.ctx.report("internal", f"file source frame {i}: {e}")
        logger.info("file source done after %d frames; ending the session", total)
        await self.ctx.end("completed")

    async def close(self) -> None:
        """Stop playing."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait([self._task])


def _webrtc(ctx: SessionContext[Any], cfg: IngressConfig, deliver: Deliver) -> CallerSource:
    """A browser's microphone (aiortc is loaded only by replicas that serve one)."""
    from services.ingress.webrtc import WebRtcSource

    return WebRtcSource(ctx, cfg, deliver)


def _livekit(ctx: SessionContext[Any], cfg: IngressConfig, deliver: Deliver) -> CallerSource:
    """The caller's microphone in a LiveKit room (the rtc SDK is loaded only by replicas that serve one)."""
    from services.ingress.livekit import LiveKitSource

    return LiveKitSource(ctx, cfg, deliver)


SOURCES: dict[str, Callable[[SessionContext[Any], IngressConfig, Deliver], CallerSource]] = {
    "bus": BusSource,
    "file": FileSource,
    "webrtc": _webrtc,
    "livekit": _livekit,
}
