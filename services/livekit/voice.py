"""The agent's voice as a LiveKit audio track, fed one frame at a time by the egress's paced playout.

The egress hands each 20 ms frame over when it is due, so the track's queue (``VB_LIVEKIT_QUEUE_MS``)
only absorbs scheduling jitter: it stays at a frame or two, and an interrupt (``flush``) has almost
nothing to drop. The SDK's source drains its queue in real time whether or not the track is published,
so feeding it never stalls the playout while the agent is (re)joining the room; that audio is unheard.
"""

from __future__ import annotations

from livekit import rtc

TRACK_NAME = "agent-voice"


class AgentVoice:
    """An ``rtc.AudioSource`` at the session's output rate, and the tracks published from it."""

    def __init__(self, rate: int, queue_ms: int) -> None:
        self.rate = rate
        self.source = rtc.AudioSource(rate, 1, queue_size_ms=queue_ms)

    def track(self) -> rtc.LocalAudioTrack:
        """A new track of this voice (one per room connection: a rejoin publishes a new one)."""
        return rtc.LocalAudioTrack.create_audio_track(TRACK_NAME, self.source)

    async def publish(self, room: rtc.Room) -> rtc.LocalTrackPublication:
        """Publish the voice in ``room`` as the agent's microphone."""
        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        return await room.local_participant.publish_track(self.track(), options)

    async def play(self, pcm: bytes) -> None:
        """Queue one frame of mono s16 audio (returns at once unless the queue is full)."""
        await self.source.capture_frame(rtc.AudioFrame(pcm, self.rate, 1, len(pcm) // 2))

    @property
    def queued_s(self) -> float:
        """Audio handed over but not yet sent (the SDK's estimate)."""
        return self.source.queued_duration

    def flush(self) -> None:
        """Drop what is queued: a barge-in must not hear the rest of a cut reply."""
        self.source.clear_queue()

    async def aclose(self) -> None:
        """Release the source."""
        await self.source.aclose()
