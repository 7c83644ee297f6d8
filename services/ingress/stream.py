"""One session's caller stream: 16 kHz samples in; numbered frames, VAD probabilities and speech events out.

Frames go out in ``UserAudio`` events of up to ``USER_AUDIO_MAX_FRAMES`` (one message per 100 ms
instead of one per 20 ms). A frame that completes a VAD window waits only for that window's inference
(a fraction of a millisecond) so that it carries its probability. A speech start or stop is never held
back: the frames held so far go out first, then the event, in-band on ``audio.in`` (STT reads segments
from the frames in order) and on ``speech`` (egress and dialogue react without taking the audio).
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
        #: Frames numbered but not yet published: (pcm, speech probability, arrival time).
        self._held: list[tuple[bytes, float, int]] = []
        #: Set when a speech start or stop was published since the last ``save``.
        self.at_boundary = False

    async def push(
        self, samples: Samples, arrived_ns: int, *, last: bool = False, behind: bool = False
    ) -> None:
        """Number the frames ``samples`` complete (all of them, padded, when the stream ``last`` ends).

        They are published when ``USER_AUDIO_MAX_FRAMES`` are held, before a speech start or stop they
        trigger, and at the end of the stream. The VAD runs a window at once, without gathering it with
        other calls', when a speech start or stop is at most two windows away or the audio is ``behind``.
        """
        for pcm in self._framer.push(samples, pad=last):
            prob = await self._vad.push(pcm, urgent=behind or self.segmenter.deciding_soon)
            # the state moves on in one step before publishing, so a save always sees it consistent
            index, change = self.next_frame, None
            self.next_frame += 1
            if prob is not None:
                change = self.segmenter.push(prob)
                if (
                    self.segmenter.speech_window
                ):  # this frame ends a speech window: as late as speech is known
                    self.speech_end_ts = arrived_ns
            self._held.append((pcm.tobytes(), prob or 0.0, arrived_ns))
            if change is not None:
                await self.flush()
                await self._announce(change, index)
            elif len(self._held) == ev.USER_AUDIO_MAX_FRAMES:
                await self.flush()
        if last:
            await self.flush()

    async def flush(self) -> None:
        """Publish the frames held, as one UserAudio."""
        if not self._held:
            return
        held, self._held = self._held, []
        audio = ev.UserAudio(
            session=self.ctx.session,
            index=self.next_frame - len(held),
            pcm=b"".join(pcm for pcm, _, _ in held),
            speech_probs=tuple(prob for _, prob, _ in held),
        )
        await self.ctx.publish(sj.AUDIO_IN, audio)
        self._frames_in.inc(len(held))
        now = time.time_ns()
        for _, _, arrived_ns in held:
            metrics.frame_delay.observe((now - arrived_ns) / 1e9)

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

    async def save(self) -> IngressState:
        """Publish the frames held, and return the stream's state as of the last frame published.

        A successor starts at ``next_frame``: every frame before it is on the bus, none after it.
        """
        await self.flush()
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
