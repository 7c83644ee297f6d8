"""The contract: every event round-trips, bad payloads are refused with the right code, the document
matches the code, and no subject is spelled outside proto/."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto import codec, docgen, system
from proto import events as ev
from proto import subjects as sj

ROOT = Path(__file__).resolve().parent.parent
EVENT_TYPES = sorted(ev.Event.__subclasses__(), key=lambda t: t.__name__)


def strategy(t: msgspec.inspect.Type) -> st.SearchStrategy[Any]:
    """Values of a msgspec type that satisfy its constraints (patterns, lengths, ranges)."""
    mi = msgspec.inspect
    match t:
        case mi.StrType(pattern=str() as pattern):
            return st.from_regex(pattern, fullmatch=True)
        case mi.StrType():
            return st.text(min_size=t.min_length or 0, max_size=min(t.max_length or 40, 40))
        case mi.BytesType():
            lo = t.min_length or 0
            return st.binary(min_size=lo, max_size=max(lo, min(t.max_length or 64, 64)))
        case mi.BoolType():
            return st.booleans()
        case mi.IntType():
            return st.integers(min_value=t.ge if t.ge is not None else -(2**40), max_value=t.le or 2**62)
        case mi.FloatType():
            return st.floats(
                min_value=t.ge if t.ge is not None else 0.0001 if t.gt is not None else -1e6,
                max_value=t.le or 1e6,
                allow_nan=False,
            )
        case mi.LiteralType():
            return st.sampled_from(t.values)
        case mi.VarTupleType():
            return st.lists(strategy(t.item_type), max_size=3).map(tuple)
        case mi.DictType():
            return st.dictionaries(strategy(t.key_type), strategy(t.value_type), max_size=3)
        case mi.StructType():
            fields = {f.name: strategy(f.type) for f in t.fields if f.required}
            optional = {f.name: strategy(f.type) for f in t.fields if not f.required}
            return st.fixed_dictionaries(fields, optional=optional).map(lambda d: t.cls(**d))
        case mi.UnionType():
            return st.one_of(*[strategy(x) for x in t.types])
        case mi.NoneType():
            return st.none()
    raise NotImplementedError(f"no strategy for {t}")


def events_of(kind: type[ev.Event]) -> st.SearchStrategy[ev.Event]:
    if kind is ev.AgentAudioFrame:  # the frame must hold exactly 20 ms at its rate
        rates = st.sampled_from(ev.AGENT_RATES)
        return st.builds(
            lambda rate, pcm_byte, turn, index: ev.AgentAudioFrame(
                session="s1",
                turn=turn,
                index=index,
                chunk=0,
                sample_rate=rate,
                pcm=pcm_byte * ev.frame_bytes(rate),
            ),
            rates,
            st.binary(min_size=1, max_size=1),
            st.integers(0, 99),
            st.integers(0, 9999),
        )
    if kind is ev.AgentAudio:  # 1 to AGENT_AUDIO_MAX_FRAMES whole frames at its rate
        return st.builds(
            lambda rate, frames, pcm_byte, turn, index: ev.AgentAudio(
                session="s1",
                turn=turn,
                index=index,
                chunk=0,
                sample_rate=rate,
                pcm=pcm_byte * (frames * ev.frame_bytes(rate)),
            ),
            st.sampled_from(ev.AGENT_RATES),
            st.integers(1, ev.AGENT_AUDIO_MAX_FRAMES),
            st.binary(min_size=1, max_size=1),
            st.integers(0, 99),
            st.integers(0, 9999),
        )
    if kind is ev.UserAudio:  # whole 20 ms frames, one VAD probability each
        return st.integers(1, ev.USER_AUDIO_MAX_FRAMES).flatmap(
            lambda n: st.builds(
                lambda index, pcm, probs: ev.UserAudio(
                    session="s1", index=index, pcm=pcm, speech_probs=probs
                ),
                st.integers(0, 2**40),
                st.binary(min_size=n * ev.USER_FRAME_BYTES, max_size=n * ev.USER_FRAME_BYTES),
                st.tuples(*[st.floats(0.0, 1.0)] * n),
            )
        )
    if kind is ev.CallerAudio:  # whole samples of its channel count
        return st.builds(
            lambda channels, n, rate: ev.CallerAudio(
                session="s1", pcm=b"\1\0" * channels * n, sample_rate=rate, channels=channels
            ),
            st.sampled_from([1, 2]),
            st.integers(0, 960),
            st.integers(8000, 48000),
        )
    return strategy(msgspec.inspect.type_info(kind))


@pytest.mark.parametrize("kind", EVENT_TYPES, ids=lambda k: k.__name__)
@settings(
    max_examples=40, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much], deadline=None
)
@given(data=st.data())
def test_every_event_round_trips_on_its_channels(kind: type[ev.Event], data: st.DataObject) -> None:
    event = data.draw(events_of(kind))
    channels = [c for c in sj.CHANNELS if kind in c.events]
    assert channels, f"{kind.__name__} travels on no channel"
    for channel in channels:
        wire = codec.encode(event)
        if len(wire) > channel.max_bytes:
            continue
        assert codec.decode(channel.subject(event.session), wire) == event
    assert codec.decode_event(codec.encode(event)) == event


def test_stamping_sets_sequence_and_time_only() -> None:
    frame = ev.UserAudio(session="s1", index=7, pcm=b"\0" * 640, speech_probs=(0.0,))
    stamped = codec.stamp(frame, 42, 1_700_000_000_000_000_000)
    assert (stamped.seq, stamped.ts, stamped.index, stamped.pcm) == (
        42,
        1_700_000_000_000_000_000,
        7,
        frame.pcm,
    )


def user_audio(frames: int, pcm_bytes: int | None = None, session: str = "s1") -> dict[str, Any]:
    """A UserAudio as a map, so that shapes its constructor refuses can be sent too."""
    pcm = b"\0" * (frames * ev.USER_FRAME_BYTES if pcm_bytes is None else pcm_bytes)
    probs = [0.0] * frames
    return {
        "type": "UserAudio",
        "session": session,
        "index": 1,
        "pcm": pcm,
        "sample_rate": 16000,
        "speech_probs": probs,
    }


def frame_bytes(session: str = "s1") -> bytes:
    return codec.encode(user_audio(1, session=session))


def test_user_audio_carries_consecutive_frames() -> None:
    pcm = b"".join(bytes([k]) * ev.USER_FRAME_BYTES for k in range(3))
    audio = ev.UserAudio(session="s1", index=10, pcm=pcm, speech_probs=(0.0, 0.9, 0.0))
    assert (audio.frames, audio.audio_ms) == (3, 200)
    assert [(i, p[0], len(p)) for i, p in audio.each_frame()] == [(10, 0, 640), (11, 1, 640), (12, 2, 640)]


@pytest.mark.parametrize(
    ("frames", "pcm_bytes", "message"),
    [
        (1, 320, "pcm of 320 bytes is not 1 to 5 whole 20 ms frames of 640 bytes"),
        (2, 1000, "pcm of 1000 bytes is not 1 to 5 whole 20 ms frames"),
        (6, 6 * 640, "pcm of 3840 bytes is not 1 to 5 whole 20 ms frames"),
        (0, 0, "pcm of 0 bytes is not 1 to 5 whole"),
        (1, 2 * 640, "1 speech_probs for 2 frames"),
    ],
)
def test_user_audio_of_partial_or_too_many_frames_is_refused(
    frames: int, pcm_bytes: int, message: str
) -> None:
    probs = (0.0,) * frames
    with pytest.raises(ValueError, match=message):
        ev.UserAudio(session="s1", index=0, pcm=b"\0" * pcm_bytes, speech_probs=probs)


def test_agent_audio_splits_into_the_frames_egress_plays() -> None:
    words = (ev.WordTiming(text="Hello", start_ms=0, end_ms=300),)
    pcm = b"".join(bytes([i]) * ev.frame_bytes(16000) for i in range(3))
    audio = ev.AgentAudio(
        session="s1",
        seq=9,
        ts=5,
        turn=2,
        generation=1,
        index=40,
        chunk=3,
        pcm=pcm,
        sample_rate=16000,
        words=words,
    )
    frames = audio.split()
    assert audio.frames == len(frames) == 3
    assert [f.index for f in frames] == [40, 41, 42]
    assert b"".join(f.pcm for f in frames) == pcm and frames[1].pcm == b"\1" * ev.frame_bytes(16000)
    assert [f.words for f in frames] == [words, (), ()]
    assert {(f.session, f.seq, f.ts, f.turn, f.generation, f.chunk, f.sample_rate) for f in frames} == {
        ("s1", 9, 5, 2, 1, 3, 16000)
    }


def test_agent_audio_of_broken_or_too_many_frames_is_refused() -> None:
    size = ev.frame_bytes(24000)
    with pytest.raises(ValueError, match="not whole 20 ms frames"):
        ev.AgentAudio(session="s1", turn=1, index=0, chunk=0, pcm=bytes(size + 1), sample_rate=24000)
    with pytest.raises(ValueError, match="11 frames exceeds 10 per event"):
        ev.AgentAudio(session="s1", turn=1, index=0, chunk=0, pcm=bytes(11 * size), sample_rate=24000)
    assert (
        ev.AgentAudio(session="s1", turn=1, index=0, chunk=0, pcm=bytes(10 * size), sample_rate=24000).frames
        == 10
    )


def agent_audio(kind: str, pcm_bytes: int, sample_rate: int = 24000) -> bytes:
    """An agent audio payload built field by field, so that it can break the event's own checks."""
    fields = {"session": "s1", "turn": 1, "index": 0, "chunk": 0, "pcm": bytes(pcm_bytes)}
    return codec.encode({"type": kind, **fields, "sample_rate": sample_rate})


@pytest.mark.parametrize(
    ("subject", "payload", "code", "message"),
    [
        ("vb.s1.audio.in", b"\xc1garbage", "malformed", "undecodable"),
        ("vb.s1.audio.in", frame_bytes()[:-5], "malformed", "truncated"),
        ("vb.s1.audio.in", b"\0" * 5000, "oversized", "exceeds its limit"),
        ("vb.s1.transcript", frame_bytes(), "wrong_subject", "invalid transcript event"),
        ("vb.s2.audio.in", frame_bytes("s1"), "unknown_session", "arrived on"),
        ("vb.s1.nope", frame_bytes(), "wrong_subject", "not a voicebus session subject"),
        ("vb.s1.audio.in", codec.encode(user_audio(1, 320)), "malformed", "length >= 640"),
        ("vb.s1.audio.in", codec.encode(user_audio(2, 1000)), "malformed", "not 1 to 5 whole 20 ms frames"),
        ("vb.s1.audio.in", codec.encode(user_audio(6)), "malformed", "length <= 3200"),
        (
            "vb.s1.audio.in",
            codec.encode({**user_audio(2), "speech_probs": [0.5]}),
            "malformed",
            "1 speech_probs",
        ),
        ("vb.s1.audio.in", frame_bytes().replace(b"\xcd>\x80", b"\xcd\x1f@"), "malformed", "sample_rate"),
        (
            "vb.s1.media.in",
            codec.encode({"type": "CallerAudio", "session": "s1", "pcm": b"\0" * 3, "sample_rate": 16000}),
            "malformed",
            "whole s16le samples",
        ),
        ("vb.s1.media.out", agent_audio("AgentAudioFrame", 640), "malformed", "is not 20 ms"),
        (
            "vb.s1.media.out",
            agent_audio("AgentAudioFrame", 640, 11025),
            "malformed",
            "Invalid enum value 11025",
        ),
        ("vb.s1.audio.out", agent_audio("AgentAudioFrame", 960), "wrong_subject", "invalid audio.out event"),
        ("vb.s1.audio.out", agent_audio("AgentAudio", 960 * 3 + 2), "malformed", "is not whole 20 ms frames"),
        ("vb.s1.audio.out", agent_audio("AgentAudio", 0), "malformed", "is not whole 20 ms frames"),
        (
            "vb.s1.audio.out",
            agent_audio("AgentAudio", 960 * 11),
            "malformed",
            "11 frames exceeds 10 per event",
        ),
    ],
)
def test_bad_payloads_are_refused_with_a_clear_code(
    subject: str, payload: bytes, code: str, message: str
) -> None:
    with pytest.raises(codec.ContractError) as err:
        codec.decode(subject, payload)
    assert err.value.code == code
    assert message in str(err.value)


def test_every_event_type_has_a_channel_and_channels_do_not_overlap() -> None:
    carried = {t for c in sj.CHANNELS for t in c.events}
    assert carried == set(EVENT_TYPES)
    patterns = sj.recorded_patterns()
    assert len(patterns) == len(set(patterns))
    conversation = [c for c in sj.CHANNELS if not c.is_media]
    media = [c for c in sj.CHANNELS if c.is_media]
    # conversation channels have one token after the session (the edge follows them all on vb.<s>.*,
    # with no audio), media channels two
    assert all(c.name.count(".") == 0 for c in conversation)
    assert all(c.name.count(".") == 1 for c in media)
    assert not any(c.acked for c in media)  # audio is never held up by the stream's ack


def test_system_records_round_trip() -> None:
    spec = ev.SessionSpec(session="abc")
    for record in [
        system.ClaimRequest(spec=spec),
        system.ClaimReply(session="abc", stage="stt", replica="r1", epoch=3),
        system.OwnerRecord(session="abc", stage="stt", replica="r1", epoch=3, claimed_ts=5),
        system.ReplicaLease(stage="stt", replica="r1", host="h", pid=1, started_ts=1, beat_ts=2),
        system.Checkpoint(session="abc", stage="stt", epoch=1, cursors={"events": 9}, state=b"\x90"),
    ]:
        assert codec.decode_record(type(record), codec.encode(record)) == record
    with pytest.raises(codec.ContractError, match="invalid SessionSpec"):
        codec.decode_record(ev.SessionSpec, codec.encode({"session": "abc", "output_rate": 12345}))


def test_contract_document_matches_the_code() -> None:
    assert docgen.DOCUMENT.read_text() == docgen.render(), "proto/asyncapi.json is stale: run `just proto`"


def test_document_describes_every_channel_and_event() -> None:
    doc = docgen.build()
    addresses = {ch["address"] for ch in doc["channels"].values()}
    assert {f"vb.{{session}}.{c.name}" for c in sj.CHANNELS} <= addresses
    assert {t.__name__ for t in EVENT_TYPES} <= set(doc["components"]["schemas"])
    pcm = doc["components"]["schemas"]["UserAudio"]["properties"]["pcm"]
    assert (pcm["minLength"], pcm["maxLength"]) == (640, 5 * 640)


def test_no_subject_is_spelled_outside_proto() -> None:
    literal = re.compile(r"""["'](vb|vbsys|\$KV)\.[\w{*>]""")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in (ROOT / "services").rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if literal.search(line)
    ]
    assert not offenders, f"subject literals outside proto/: {offenders}"
