"""One session's caller stream: 16 kHz samples in; numbered frames, VAD probabilities and speech events out.

Each frame is published as soon as it is whole; a frame that completes a VAD window waits only for
that window's inference (a fraction of a millisecond) so that it carries its probability, and a speech
start or stop it triggers follows it at once, in-band on ``audio.in`` (STT reads segments from the
frames in order) and on ``speech`` (egress and dialogue react without taking the audio).
"""

from __future__ import annotations

import copy
import time
from typing import Any

from proto import events as ev
from proto import subjects as sj
from proto.state import IngressState
from services.ingress import metrics
from services.ingress.audio import Framer, Samples
from services.ingress.config import IngressConfig
from services.ingress.segmenter import SpeechSegmenter, Started, Stopped
from services.ingress.vad import SileroVad, VadStream
from services.runtime.service import SessionContext


class CallerStream:
    """Frames, VAD and segmentation of one session, restorable from the state it saves."""

    def __init__(
        self,
        ctx: SessionContext[Any],
        model: SileroVad,
        cfg: IngressConfig,
        restored: IngressState | None = None,
    ) -> None:
        state = restored or IngressState()
        self.ctx = ctx
        self.next_frame = state.next_frame
        self.speech_end_ts = state.speech_end_ts
        self._framer = Framer(state.pending_pcm)
        self._vad = VadStream(model, state=state.vad_state, pending=state.vad_pcm)
        self.segmenter = SpeechSegmenter(
            threshold=cfg.threshold,
            neg_threshold=cfg.neg_threshold,
            min_speech_ms=cfg.min_speech_ms,
            min_silence_ms=cfg.min_silence_ms,
            state=state.speech,
        )
        self._frames_in = metrics.frames_in.labels(ctx.spec.source)
        #: Set when a speech start or stop was published since the last ``save``.
        self.at_boundary = False

    async def push(self, samples: Samples, arrived_ns: int, *, last: bool = False) -> None:
        """Publish the frames ``samples`` complete (all of them, padded, when the stream ``last`` ends)."""
        for pcm in self._framer.push(samples, pad=last):
            prob = await self._vad.push(pcm)
            # the state moves on in one step before publishing, so a save always sees it consistent
            index, change = self.next_frame, None
            self.next_frame += 1
            if prob is not None:
                change = self.segmenter.push(prob)
                if (
                    self.segmenter.speech_window
                ):  # this frame ends a speech window: as late as speech is known
                    self.speech_end_ts = arrived_ns
            frame = ev.UserAudioFrame(
                session=self.ctx.session, index=index, pcm=pcm.tobytes(), speech_prob=prob or 0.0
            )
            await self.ctx.publish(sj.AUDIO_IN, frame)
            self._frames_in.inc()
            metrics.frame_delay.observe((time.time_ns() - arrived_ns) / 1e9)
            if change is not None:
                await self._announce(change, index)

    async def _announce(self, change: Started | Stopped, at_frame: int) -> None:
        session = self.ctx.session
        event: ev.Event
        match change:
            case Started(segment=segment, start_ms=start_ms):
                event = ev.SpeechStarted(
                    session=session, segment=segment, start_ms=start_ms, at_frame=at_frame
                )
            case Stopped(segment=segment, start_ms=start_ms, end_ms=end_ms):
                event = ev.SpeechStopped(
                    session=session,
                    segment=segment,
                    start_ms=start_ms,
                    end_ms=end_ms,
                    at_frame=at_frame,
                    speech_end_ts=self.speech_end_ts,
                )
        await self.ctx.publish(sj.AUDIO_IN, event)
        await self.ctx.publish(sj.SPEECH, event)
        self.at_boundary = True

    def save(self) -> IngressState:
        """The stream's state as of the last frame published."""
        vad_state, vad_pcm = self._vad.save()
        self.at_boundary = False
        return IngressState(
            next_frame=self.next_frame,
            speech=copy.copy(self.segmenter.state),
            speech_end_ts=self.speech_end_ts,
            pending_pcm=self._framer.pending,
            vad_pcm=vad_pcm,
            vad_state=vad_state,
        )
