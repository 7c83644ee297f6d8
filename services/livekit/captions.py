"""Captions of both sides and the agent's state, written to the room the way LiveKit's clients read them.

- Transcriptions are text streams on topic ``lk.transcription`` (what livekit-agents sends and the
  client components read), sent on behalf of whoever spoke (``sender_identity``), with the attributes
  ``lk.segment_id``, ``lk.transcription_final`` and ``lk.transcribed_track_id``. The caller's: one
  stream per transcript of a segment (a later one replaces an earlier one with the same segment id),
  final with the STT's final. The agent's: one stream per reply, its words written as they are played
  (from the TTS's word timings on the frames, so the caption follows the voice), closed final when the
  reply stops: a reply cut off by a barge-in is captioned as far as it was heard.
- The agent's state is its participant attribute ``lk.agent.state``: listening, thinking (the caller's
  turn ended), speaking (a reply is playing), listening again (it stopped or paused for the caller).

Writes go through one bounded queue and one task, in order and off the playout's path: a slow data
channel must not delay the voice. When the queue is full the oldest write is dropped (and counted).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from livekit import rtc
from prometheus_client import Counter

from proto import events as ev
from proto.events import FRAME_MS
from services.livekit.config import LiveKitConfig
from services.livekit.room import RoomTarget

logger = logging.getLogger("voicebus.livekit")

TOPIC = "lk.transcription"
SEGMENT_ID = "lk.segment_id"
FINAL = "lk.transcription_final"
TRACK_ID = "lk.transcribed_track_id"
STATE = "lk.agent.state"
LISTENING, THINKING, SPEAKING = "listening", "thinking", "speaking"
QUEUE = 256

dropped = Counter(
    "vb_livekit_captions_dropped_total", "Caption or state writes dropped (queue full, no room)"
)

Write = Callable[[rtc.Room], Awaitable[None]]


@dataclass
class _Reply:
    """The caption of one reply while it plays: words not yet due, and the stream written so far."""

    segment: str
    pending: list[ev.WordTiming] = field(default_factory=list)
    writer: rtc.TextStreamWriter | None = None
    said: bool = False


class RoomCaptions:
    """One session's captions and agent state; ``run`` writes them to whatever room is ``attach``-ed."""

    def __init__(self, cfg: LiveKitConfig, session: str, target: RoomTarget) -> None:
        self.cfg, self.session, self.target = cfg, session, target
        self.agent_track = ""
        self.state = LISTENING
        self._room: rtc.Room | None = None
        self._replies: dict[tuple[int, int], _Reply] = {}
        self._queue: collections.deque[Write] = collections.deque()
        self._wake = asyncio.Event()

    def attach(self, room: rtc.Room, agent_track: str) -> None:
        """Write to ``room`` from now on (after each join), starting with the current state."""
        self._room, self.agent_track = room, agent_track
        self.restate()

    def restate(self) -> None:
        """Say the current state again (the SDK restored its connection, maybe as a new participant)."""
        self._put(self._set_state(self.state))

    # --- what the session says ------------------------------------------------------------------------

    def set_state(self, state: str) -> None:
        """The agent is listening, thinking or speaking."""
        if state != self.state:
            self.state = state
            self._put(self._set_state(state))

    def caller_said(self, transcript: ev.Transcript) -> None:
        """A transcript of the caller's speech (interim or final)."""
        segment = f"{self.session}-u{transcript.turn}-{transcript.segment}"
        self._put(self._caller_caption(segment, transcript.text, transcript.is_final))

    def agent_played(self, frame: ev.AgentAudioFrame) -> None:
        """A frame of a reply just went out: caption the words that have started by its end."""
        key = (frame.turn, frame.generation)
        reply = self._replies.get(key)
        if reply is None:
            reply = self._replies[key] = _Reply(f"{self.session}-a{frame.turn}-{frame.generation}")
        reply.pending.extend(frame.words)
        until_ms = (frame.index + 1) * FRAME_MS
        due = [w.text for w in reply.pending if w.start_ms < until_ms]
        if due:
            reply.pending = [w for w in reply.pending if w.start_ms >= until_ms]
            self._put(self._agent_words(reply, due))

    def agent_stopped(self, stopped: ev.PlayoutStopped) -> None:
        """A reply is over: close its caption (the rest of its words only if it played to the end)."""
        reply = self._replies.pop((stopped.turn, stopped.generation), None)
        if reply is None:
            reply = _Reply(f"{self.session}-a{stopped.turn}-{stopped.generation}")
        rest = [w.text for w in reply.pending] if stopped.completed else []
        self._put(self._agent_final(reply, rest, stopped.heard_text))

    # --- the writer task ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Write queued captions in order; a failed write is logged and the next one goes on."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                write = self._queue.popleft()
                room = self._room
                if room is None or not room.isconnected():
                    dropped.inc()
                    continue
                try:
                    await write(room)
                except (rtc.StreamError, ConnectionError, RuntimeError) as e:
                    logger.warning("caption write failed: %s", e)

    def _put(self, write: Write) -> None:
        if len(self._queue) >= QUEUE:
            self._queue.popleft()
            dropped.inc()
        self._queue.append(write)
        self._wake.set()

    def _set_state(self, state: str) -> Write:
        async def write(room: rtc.Room) -> None:
            await room.local_participant.set_attributes({STATE: state})

        return write

    def _caller_caption(self, segment: str, text: str, final: bool) -> Write:
        async def write(room: rtc.Room) -> None:
            attributes = {SEGMENT_ID: segment, FINAL: str(final).lower()}
            caller = self.target.caller(self.cfg, room)
            if caller is not None and caller[1]:
                attributes[TRACK_ID] = caller[1]
            writer = await room.local_participant.stream_text(
                topic=TOPIC, attributes=attributes, sender_identity=caller[0].identity if caller else None
            )
            await writer.write(text)
            await writer.aclose()

        return write

    def _agent_words(self, reply: _Reply, words: list[str]) -> Write:
        async def write(room: rtc.Room) -> None:
            if reply.writer is None:
                attributes = {SEGMENT_ID: reply.segment, FINAL: "false"}
                if self.agent_track:
                    attributes[TRACK_ID] = self.agent_track
                reply.writer = await room.local_participant.stream_text(topic=TOPIC, attributes=attributes)
            await reply.writer.write((" " if reply.said else "") + " ".join(words))
            reply.said = True

        return write

    def _agent_final(self, reply: _Reply, rest: list[str], heard: str) -> Write:
        async def write(room: rtc.Room) -> None:
            if rest or (not reply.said and heard):
                await self._agent_words(reply, rest or [heard])(room)
            if reply.writer is not None:
                await reply.writer.aclose(attributes={FINAL: "true"})

        return write
