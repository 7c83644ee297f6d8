"""A Deepgram live STT server (``/v1/listen``) on 127.0.0.1 for tests of the real adapter and SDK.

It speaks the wire protocol of shared/reference/providers.md (checked against deepgram-sdk 7.17): the
handshake checks path, query and ``Authorization: Token``; binary frames are linear16 audio that
advance an audio clock; text frames are KeepAlive, Finalize and CloseStream; the server answers with
Results, SpeechStarted, UtteranceEnd, Metadata, and closes 1011 NET-0001 after ``idle_s`` without a
message.

Recognition is scripted but driven by the audio content: speech is a tone (``speech()``), silence is
zeros; each scripted utterance has its own pitch, and its words are heard one per ``word_s`` seconds of
audio at that pitch. A client that drops or repeats audio therefore gets fewer or repeated words, as it
would from the real service. Interim results come every ``interim_s`` of audio, a final with
``speech_final`` after ``endpointing`` ms of silence, one with ``from_finalize`` on Finalize (when at
least ``finalize_min_s`` of audio is unfinalized: the real service does not promise an answer below
that), and UtteranceEnd ``utterance_end_ms`` after the last word.

Faults: handshake refusals (401, 429 with retry-after, 5xx, each with ``dg-error``) and, mid-stream, a
close (1011), a TCP abort, a silent hang (socket open, nothing sent) or an Error message, at an audio
time or on Finalize. Every connection is recorded (query, headers, control messages, audio bytes,
what was sent back, how it closed) so tests can assert what the client did.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

RATE = 16_000
BYTES_PER_S = RATE * 2
SPEECH_RMS = 300.0
_BOOLEAN_PARAMS = ("interim_results", "vad_events", "smart_format", "punctuate")


@dataclass
class Utterance:
    """What the caller says in one speech segment; each word takes ``word_s`` seconds of speech."""

    text: str
    hz: float = 300.0  # the pitch this utterance is "spoken" at: how the fake tells utterances apart
    word_s: float = 0.25


@dataclass
class HandshakeFault:
    """Refuse a connection attempt with this HTTP status."""

    status: int
    dg_error: str = "Service unavailable"
    retry_after: float | None = None


@dataclass
class StreamFault:
    """Break an open connection when the audio clock reaches ``at_s`` (or on Finalize when None)."""

    kind: Literal["close", "abort", "hang", "error"]
    at_s: float | None = None
    code: int = 1011
    reason: str = "NET-0000"


@dataclass
class Connection:
    """What one connection attempt did, seen from the server."""

    path: str
    query: dict[str, str]
    headers: dict[str, str]
    status: int = 101
    messages: list[str] = field(default_factory=list)  # control messages from the client, in order
    audio_bytes: int = 0
    sent: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    closed_by: Literal["client", "server"] | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def keepalives(self) -> int:
        return self.messages.count("KeepAlive")

    @property
    def finalizes(self) -> int:
        return self.messages.count("Finalize")

    def sent_types(self) -> list[str]:
        return [m["type"] for m in self.sent]


class FakeDeepgram:
    """The server; use ``async with FakeDeepgram(...) as fake`` and point the adapter at ``fake.url``."""

    def __init__(
        self,
        *,
        api_key: str,
        script: Iterable[Utterance] = (),
        idle_s: float = 10.0,
        interim_s: float = 0.5,
        finalize_min_s: float = 0.1,
        final_every_s: float | None = None,
        turn_gap_s: float | None = None,
    ) -> None:
        self.api_key, self.script = api_key, list(script)
        self.idle_s, self.interim_s, self.finalize_min_s = idle_s, interim_s, finalize_min_s
        #: long speech gets an is_final (without speech_final) this often, as the real service does
        self.final_every_s = final_every_s
        #: recorded voices instead of tones: the script is heard in order, the next utterance once
        #: audio resumes after this many seconds (wall clock) without any: the caller's next turn
        self.turn_gap_s = turn_gap_s
        #: refusals for the next attempts, in order; ``refuse_all`` refuses every attempt
        self.handshake_faults: list[HandshakeFault] = []
        self.refuse_all: HandshakeFault | None = None
        #: faults for the next accepted connections, in order (None: a healthy connection)
        self.stream_faults: list[StreamFault | None] = []
        self.connections: list[Connection] = []
        self._records: dict[ServerConnection, Connection] = {}
        self._server: Server | None = None
        self._changed = asyncio.Condition()

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate`` (over the records) holds; it is checked after every message."""
        async with self._changed:
            await self._changed.wait_for(predicate)

    async def notify(self) -> None:
        """A record changed: wake ``until``."""
        async with self._changed:
            self._changed.notify_all()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}"

    @property
    def accepted(self) -> list[Connection]:
        return [c for c in self.connections if c.status == 101]

    async def __aenter__(self) -> FakeDeepgram:
        # no flow control: a session busy closing must still read the client's close frame behind its audio
        self._server = await serve(
            self._session, "127.0.0.1", 0, process_request=self._handshake, max_queue=None
        )
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def _handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        record = Connection(
            path=url.path,
            query=dict(parse_qsl(url.query)),
            headers={k.lower(): v for k, v in request.headers.raw_items()},
        )
        self.connections.append(record)
        refusal = self._refusal(record)
        if refusal is None:
            self._records[connection] = record
            return None
        record.status = refusal.status
        body = json.dumps({"err_code": refusal.dg_error, "err_msg": refusal.dg_error, "request_id": "fake"})
        response = connection.respond(refusal.status, body)
        response.headers["dg-error"] = refusal.dg_error
        if refusal.retry_after is not None:
            response.headers["Retry-After"] = f"{refusal.retry_after:g}"
        return response

    def _refusal(self, record: Connection) -> HandshakeFault | None:
        q = record.query
        if record.path != "/v1/listen":
            return HandshakeFault(404, "Not found")
        if record.headers.get("authorization") != f"Token {self.api_key}":
            return HandshakeFault(401, "INVALID_AUTH: invalid credentials")
        if self.refuse_all is not None:
            return self.refuse_all
        if self.handshake_faults:
            return self.handshake_faults.pop(0)
        problems = [
            "model missing" if not q.get("model") else "",
            "encoding must be linear16" if q.get("encoding") != "linear16" else "",
            "sample_rate must be 16000" if q.get("sample_rate") != str(RATE) else "",
            "channels must be 1" if q.get("channels", "1") != "1" else "",
            *(
                f"{p} must be true or false"
                for p in _BOOLEAN_PARAMS
                if q.get(p, "true") not in ("true", "false")
            ),
            "endpointing must be ms or false" if not _ms_or_false(q.get("endpointing", "10")) else "",
            "utterance_end_ms needs interim_results=true"
            if "utterance_end_ms" in q and q.get("interim_results") != "true"
            else "",
        ]
        problems = [p for p in problems if p]
        return HandshakeFault(400, "Bad Request: " + "; ".join(problems)) if problems else None

    async def _session(self, ws: ServerConnection) -> None:
        record = self._records.pop(ws)
        fault = self.stream_faults.pop(0) if self.stream_faults else None
        await _Session(self, ws, record, fault).run()


def _ms_or_false(value: str) -> bool:
    return value == "false" or value.isdigit()


@dataclass
class _Word:
    text: str
    shown: str  # as punctuated/smart-formatted
    start: float
    end: float


class _Session:
    """One accepted connection: the audio clock, the scripted recognizer and the fault."""

    def __init__(
        self, fake: FakeDeepgram, ws: ServerConnection, record: Connection, fault: StreamFault | None
    ):
        self.fake, self.ws, self.record, self.fault = fake, ws, record, fault
        q = record.query
        endpointing = q.get("endpointing", "false")
        self.endpointing = int(endpointing) * BYTES_PER_S // 1000 if endpointing != "false" else 0
        self.utterance_end_s = int(q["utterance_end_ms"]) / 1000 if "utterance_end_ms" in q else None
        self.vad_events = q.get("vad_events") == "true"
        self.punctuate = q.get("punctuate") == "true" or q.get("smart_format") == "true"
        self.request_id = str(uuid.uuid4())
        self.clock = 0  # bytes of audio received
        self.final_end = 0  # clock at the end of the last final
        self.last_interim = 0
        self.silence = 0  # bytes of silence since the last speech
        self.in_speech = False
        self.spoken = [0.0] * len(fake.script)  # seconds of each utterance's speech heard
        self.heard: list[_Word] = []  # words heard, in order
        self.finalized = 0  # how many of them went out in a final
        self.last_word_end: float | None = None  # for UtteranceEnd
        self.hung = False
        self.current = 0  # the utterance being said (turn_gap_s mode)
        self.last_audio_at: float | None = None

    async def run(self) -> None:
        try:
            while True:
                message = await self._receive()
                if message is None:
                    return
                if isinstance(message, bytes):
                    self.record.audio_bytes += len(message)
                    if not self.hung:
                        await self._audio(message)
                else:
                    kind = json.loads(message).get("type", "?")
                    self.record.messages.append(kind)
                    if not self.hung and await self._control(kind):
                        return
                await self.fake.notify()
        except ConnectionClosed as closed:
            if self.record.closed_by is None:
                self.record.closed_by = "client"
                self.record.close_code = closed.rcvd.code if closed.rcvd else 1006
        finally:
            self.record.closed.set()
            await self.fake.notify()

    async def _receive(self) -> str | bytes | None:
        """The next message; None once the idle rule has closed the connection (a hung server has none)."""
        if self.hung:
            return await self.ws.recv()
        try:
            async with asyncio.timeout(self.fake.idle_s):
                return await self.ws.recv()
        except TimeoutError:
            await self._close(1011, "NET-0001")  # no audio or message within the window
            return None

    async def _control(self, kind: str) -> bool:
        """Handle a text message; True when the connection is over."""
        if kind == "Finalize":
            if self.fault and self.fault.at_s is None:
                await self._strike()
            elif self.clock - self.final_end >= self.fake.finalize_min_s * BYTES_PER_S:
                await self._send_final(from_finalize=True, speech_final=False)
        elif kind == "CloseStream":
            await self._send_final(from_finalize=False, speech_final=False)
            await self._send(
                {
                    "type": "Metadata",
                    "transaction_key": "deprecated",
                    "request_id": self.request_id,
                    "sha256": "0" * 64,
                    "created": "2026-11-01T00:00:00.000Z",
                    "duration": self.clock / BYTES_PER_S,
                    "channels": 1,
                }
            )
            await self._close(1000, "")
            return True
        return False

    # --- audio and recognition -------------------------------------------------------------------

    async def _audio(self, pcm: bytes) -> None:
        now = asyncio.get_running_loop().time()
        gap = self.fake.turn_gap_s
        resumed = gap is not None and self.last_audio_at is not None and now - self.last_audio_at >= gap
        if resumed and self.spoken[self.current] and self.current + 1 < len(self.fake.script):
            self.current += 1
        self.last_audio_at = now
        start = self.clock
        self.clock += len(pcm)
        hz = _tone(pcm)
        if hz is not None:
            self.silence = 0
            if not self.in_speech:
                self.in_speech = True
                if self.vad_events:
                    at = start / BYTES_PER_S
                    await self._send({"type": "SpeechStarted", "channel": [0], "timestamp": at})
            self._hear(start / BYTES_PER_S, len(pcm) / BYTES_PER_S, hz)
            every = self.fake.final_every_s
            if every and self.clock - self.final_end >= every * BYTES_PER_S and self._pending():
                await self._send_final(from_finalize=False, speech_final=False)
        else:
            self.silence += len(pcm)
            if self.in_speech and self.endpointing and self.silence >= self.endpointing:
                self.in_speech = False
                await self._send_final(from_finalize=False, speech_final=True)
        await self._utterance_end()
        if self.clock - self.last_interim >= self.fake.interim_s * BYTES_PER_S:
            self.last_interim = self.clock
            await self._send(self._results(self._pending(), is_final=False))
        if self.fault and self.fault.at_s is not None and self.clock >= self.fault.at_s * BYTES_PER_S:
            await self._strike()

    def _hear(self, at: float, seconds: float, hz: float) -> None:
        """The utterance spoken at this pitch advances; its words complete one per ``word_s`` of speech."""
        if not self.fake.script:
            return
        if self.fake.turn_gap_s is None:
            u = min(range(len(self.fake.script)), key=lambda i: abs(self.fake.script[i].hz - hz))
        else:
            u = self.current
        script, words = self.fake.script[u], self.fake.script[u].text.split()
        before = self.spoken[u]
        self.spoken[u] += seconds
        done = min(int(before / script.word_s + 1e-9), len(words))
        while done < len(words) and (done + 1) * script.word_s <= self.spoken[u] + 1e-9:
            end = at + (done + 1) * script.word_s - before - 0.05
            bare = words[done].strip(".,?!").lower()
            shown = words[done] if self.punctuate else bare  # the script is written as smart_format shows it
            self.heard.append(_Word(bare, shown, end - 0.8 * script.word_s, end))
            self.last_word_end = end
            done += 1

    async def _utterance_end(self) -> None:
        if self.utterance_end_s is None or self.last_word_end is None:
            return
        if self.clock / BYTES_PER_S - self.last_word_end >= self.utterance_end_s:
            await self._send({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": self.last_word_end})
            self.last_word_end = None

    def _pending(self) -> list[_Word]:
        return self.heard[self.finalized :]

    async def _send_final(self, *, from_finalize: bool, speech_final: bool) -> None:
        message = self._results(
            self._pending(), is_final=True, speech_final=speech_final, from_finalize=from_finalize
        )
        self.finalized = len(self.heard)
        self.final_end = self.last_interim = self.clock
        await self._send(message)

    def _results(
        self, words: list[_Word], *, is_final: bool, speech_final: bool = False, from_finalize: bool = False
    ) -> dict[str, Any]:
        return {
            "type": "Results",
            "channel_index": [0, 1],
            "duration": (self.clock - self.final_end) / BYTES_PER_S,
            "start": self.final_end / BYTES_PER_S,
            "is_final": is_final,
            "speech_final": speech_final,
            "from_finalize": from_finalize,
            "channel": {
                "alternatives": [
                    {
                        "transcript": " ".join(w.shown for w in words),
                        "confidence": 0.97 if words else 0.0,
                        "words": [
                            {
                                "word": w.text,
                                "start": round(w.start, 3),
                                "end": round(w.end, 3),
                                "confidence": 0.97,
                                "punctuated_word": w.shown,
                            }
                            for w in words
                        ],
                    }
                ]
            },
            "metadata": {
                "request_id": self.request_id,
                "model_info": {"name": "general-nova-3", "version": "2026-01-01.0", "arch": "nova-3"},
                "model_uuid": "00000000-0000-0000-0000-000000000003",
            },
        }

    # --- the wire ---------------------------------------------------------------------------------

    async def _send(self, message: dict[str, Any]) -> None:
        self.record.sent.append(message)
        await self.ws.send(json.dumps(message))

    async def _close(self, code: int, reason: str) -> None:
        self.record.closed_by, self.record.close_code = "server", code
        await self.ws.close(code, reason)

    async def _strike(self) -> None:
        fault, self.fault = self.fault, None
        assert fault is not None
        if fault.kind == "hang":
            self.hung = True
        elif fault.kind == "abort":
            self.record.closed_by, self.record.close_code = "server", 1006
            self.ws.transport.abort()
        elif fault.kind == "error":
            await self._send({"type": "Error", "variant": "InternalError", "description": "decoder failed"})
            await self._close(fault.code, fault.reason)
        else:
            await self._close(fault.code, fault.reason)


def _tone(pcm: bytes) -> float | None:
    """The dominant frequency of a chunk with speech-like energy; None for silence."""
    samples = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.float64)
    if samples.size < 32 or float(np.sqrt(np.mean(samples**2))) < SPEECH_RMS:
        return None
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.argmax(spectrum[1:]) + 1) * RATE / samples.size


# --- test audio ---------------------------------------------------------------------------------------


def speech(ms: int, hz: float = 300.0) -> bytes:
    """``ms`` of an utterance's "voice": a tone the fake recognises by its pitch."""
    t = np.arange(RATE * ms // 1000) / RATE
    return (4000 * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes()


def silence(ms: int) -> bytes:
    """``ms`` of digital silence."""
    return bytes(BYTES_PER_S * ms // 1000)


def frames(pcm: bytes) -> list[bytes]:
    """20 ms frames, as the stt service pushes them."""
    return [pcm[i : i + 640] for i in range(0, len(pcm), 640)]
