"""A WebRTC client for tests, standing in for the browser: publish audio by WHIP, play by WHEP (aiortc).

Both sides of a test run on this machine; aioice leaves loopback out of its candidates, so the test
process offers 127.0.0.1 explicitly (the replicas get ``VB_WEBRTC_HOST_ADDRESSES=127.0.0.1``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
import numpy as np
import numpy.typing as npt
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame

from services.tools.stack import Stack, StageProcess
from services.webrtc.peer import shorten_jitter_buffer, use_host_addresses

RATE = 48_000
SAMPLES = 960
LOOPBACK = ("127.0.0.1",)
#: What a replica needs to be reachable from the test peer over loopback.
LOOPBACK_ENV = {"VB_WEBRTC_HOST_ADDRESSES": ",".join(LOOPBACK)}


async def start_replica(stack: Stack, stage: str, **env: str) -> StageProcess:
    """One replica of ``stage`` that offers loopback ICE candidates, ready."""
    process = stack.spawn(stage, env={**LOOPBACK_ENV, **env})
    await stack.wait_ready_async([process])
    return process


def tone(seconds: float, rate: int = RATE, hz: float = 440.0, level: float = 0.3) -> npt.NDArray[np.int16]:
    """A sine tone as s16 samples."""
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * hz * t) * level * 32767).astype(np.int16)


def rms(pcm: npt.NDArray[np.int16]) -> float:
    """Root mean square of s16 samples, in full-scale units (0..1)."""
    return float(np.sqrt(np.mean((pcm.astype(np.float64) / 32768) ** 2))) if len(pcm) else 0.0


class SamplesTrack(MediaStreamTrack):
    """Mono 48 kHz audio sent in real time, 20 ms per frame, then silence; notes when it started."""

    kind = "audio"

    def __init__(self, samples: npt.NDArray[np.int16], lead_s: float = 0.0) -> None:
        super().__init__()
        lead = np.zeros(int(lead_s * RATE), np.int16)
        self.samples = np.concatenate((lead, samples))
        self.lead_s = lead_s
        self.sent = 0
        self.start: float | None = None

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self.start is None:
            self.start = time.time()
        else:
            await asyncio.sleep(max(0.0, self.start + self.sent * SAMPLES / RATE - time.time()))
        chunk = self.samples[self.sent * SAMPLES : (self.sent + 1) * SAMPLES]
        chunk = np.concatenate((chunk, np.zeros(SAMPLES - len(chunk), np.int16)))
        frame = AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, self.sent * SAMPLES, fractions.Fraction(1, RATE)
        self.sent += 1
        return frame

    @property
    def audio_start(self) -> float:
        """Wall-clock time the first non-silent sample was sent."""
        assert self.start is not None
        return self.start + self.lead_s


@dataclass
class Heard:
    """What a WHEP client received: 20 ms mono frames with their arrival times."""

    frames: list[tuple[float, npt.NDArray[np.int16]]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def loud(self, threshold: float = 0.02) -> list[float]:
        """Arrival times of frames louder than ``threshold`` (RMS)."""
        return [t for t, pcm in self.frames if rms(pcm) > threshold]

    async def wait_loud(self, count: int, timeout: float = 20.0) -> list[float]:
        """Wait for ``count`` loud frames; returns their arrival times."""
        await self._until(lambda: len(self.loud()) >= count, timeout)
        return self.loud()

    async def wait_frames(self, count: int, timeout: float = 20.0) -> None:
        """Wait until ``count`` frames, loud or not, have arrived."""
        await self._until(lambda: len(self.frames) >= count, timeout)

    async def _until(self, done: Callable[[], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not done():
                self.changed.clear()
                await self.changed.wait()


async def _negotiate(pc: RTCPeerConnection, http: aiohttp.ClientSession, url: str, token: str) -> str:
    await pc.setLocalDescription(await pc.createOffer())
    headers = {"Content-Type": "application/sdp"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with http.post(url, data=pc.localDescription.sdp, headers=headers) as response:
        body = await response.text()
        if response.status != 201:
            raise AssertionError(f"{url}: {response.status} {body}")
        location = response.headers["Location"]
    await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
    return location


async def wait_connected(pc: RTCPeerConnection, timeout: float = 20.0) -> None:
    """Wait until the peer connection is connected."""
    done = asyncio.Event()
    pc.on("connectionstatechange", lambda: done.set() if pc.connectionState == "connected" else None)
    if pc.connectionState != "connected":
        async with asyncio.timeout(timeout):
            await done.wait()


@contextlib.asynccontextmanager
async def publish(
    http: aiohttp.ClientSession, url: str, track: MediaStreamTrack, token: str = ""
) -> AsyncIterator[RTCPeerConnection]:
    """WHIP: send ``track`` to ``url`` for the life of the context."""
    use_host_addresses(LOOPBACK)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver(track, direction="sendonly")
    try:
        await _negotiate(pc, http, url, token)
        yield pc
    finally:
        await pc.close()


@contextlib.asynccontextmanager
async def play(
    http: aiohttp.ClientSession, url: str, token: str = ""
) -> AsyncIterator[tuple[RTCPeerConnection, Heard]]:
    """WHEP: receive from ``url`` for the life of the context; frames collect in the ``Heard``."""
    use_host_addresses(LOOPBACK)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    # decode on arrival (aiortc would hold 4 packets): what is measured is the server's part
    shorten_jitter_buffer(pc.addTransceiver("audio", direction="recvonly").receiver, 0)
    heard = Heard()
    tracks: list[MediaStreamTrack] = []
    pc.on("track", tracks.append)

    async def listen() -> None:
        while True:
            try:
                frame = await tracks[0].recv()
            except MediaStreamError:
                return
            stereo = frame.to_ndarray().reshape(-1, len(frame.layout.channels))
            heard.frames.append((time.time(), stereo[:, 0].copy()))
            heard.changed.set()

    task: asyncio.Task[None] | None = None
    try:
        await _negotiate(pc, http, url, token)
        assert tracks, "the answer sends no audio"  # "track" fires while the answer is set
        task = asyncio.create_task(listen(), name="whep-listen")
        yield pc, heard
    finally:
        await pc.close()
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
