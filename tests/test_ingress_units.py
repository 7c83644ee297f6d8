"""The ingress's own logic on its own: the VAD state machine, framing, resampling, WAV reading, Silero."""

from __future__ import annotations

import asyncio
import copy
import time
import wave
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto import events as ev
from proto.state import SpeechState
from services.ingress import metrics as vad_metrics
from services.ingress import vad as vad_module
from services.ingress.audio import FRAME_SAMPLES, PCM, Framer, Resampler, WavError, read_wav, to_mono
from services.ingress.config import IngressConfig
from services.ingress.segmenter import SpeechSegmenter, Started, Stopped, windows
from services.ingress.sources import BACKLOG_NS, BusSource
from services.ingress.vad import STATE_SHAPE, SileroVad, VadModelError, VadStream

DATA = Path(__file__).parent / "data"
SPEECH_WAV = DATA / "speech_1500ms_16k.wav"


def segmenter(state: SpeechState | None = None, **overrides: float) -> SpeechSegmenter:
    params = {"threshold": 0.5, "neg_threshold": 0.35, "min_speech_ms": 96, "min_silence_ms": 200}
    params.update(overrides)
    return SpeechSegmenter(state=state, **params)  # type: ignore[arg-type]


def decisions(seg: SpeechSegmenter, probs: list[float]) -> list[tuple[int, Started | Stopped]]:
    """(window index, decision) for every window that completed one."""
    out = []
    for prob in probs:
        window = seg.state.window
        if (change := seg.push(prob)) is not None:
            out.append((window, change))
    return out


def speech_wav() -> np.ndarray:
    with wave.open(str(SPEECH_WAV), "rb") as w:
        return np.frombuffer(w.readframes(w.getnframes()), PCM)


def write_wav(path: Path, samples: np.ndarray, rate: int, channels: int = 1, width: int = 2) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return path


# --- the VAD state machine ---------------------------------------------------------------------------


def test_durations_count_whole_windows_rounded_to_the_nearest() -> None:
    assert [windows(ms) for ms in (1, 16, 48, 96, 200, 300)] == [1, 1, 2, 3, 6, 9]


def test_speech_starts_once_it_has_lasted_the_minimum_and_dates_from_its_first_window() -> None:
    seg = segmenter()
    got = decisions(seg, [0.1] * 5 + [0.9] * 2)
    assert got == [] and not seg.state.in_speech
    got = decisions(seg, [0.9])
    assert got == [(7, Started(segment=0, start_ms=5 * 32))]


def test_a_dip_below_the_threshold_before_the_start_restarts_the_count() -> None:
    got = decisions(segmenter(), [0.9, 0.9, 0.45, 0.9, 0.9, 0.9])
    assert got == [(5, Started(segment=0, start_ms=3 * 32))]


def test_speech_stops_after_the_minimum_silence_and_ends_with_its_last_speech_window() -> None:
    probs = [0.9] * 10 + [0.1] * 5
    seg = segmenter()
    assert [c for _, c in decisions(seg, probs)] == [Started(0, 0)]
    assert seg.state.in_speech
    got = decisions(seg, [0.1])  # the 6th silent window: 192 ms, 200 ms rounded to whole windows
    assert got == [(15, Stopped(segment=0, start_ms=0, end_ms=10 * 32))]


def test_hysteresis_keeps_a_segment_open_between_the_two_thresholds() -> None:
    seg = segmenter()
    # 0.4 does not start speech...
    assert decisions(seg, [0.4] * 20) == []
    # ...but once speaking, it does not count as silence, and it extends the segment's end
    decisions(seg, [0.9] * 3)
    assert decisions(seg, [0.4] * 20) == []
    got = decisions(seg, [0.2] * 6)
    assert [c for _, c in got] == [Stopped(segment=0, start_ms=20 * 32, end_ms=43 * 32)]


def test_short_pauses_do_not_split_a_segment_and_segments_count_up() -> None:
    word, pause, long_pause = [0.9] * 8, [0.1] * 4, [0.1] * 6
    got = [c for _, c in decisions(segmenter(), word + pause + word + long_pause + word + long_pause)]
    assert got == [Started(0, 0), Stopped(0, 0, 20 * 32), Started(1, 26 * 32), Stopped(1, 26 * 32, 34 * 32)]


def test_speech_window_tells_speech_from_the_trailing_silence() -> None:
    seg = segmenter()
    flags = []
    for prob in [0.9, 0.9, 0.9, 0.9, 0.1, 0.6, 0.1]:
        seg.push(prob)
        flags.append(seg.speech_window)
    assert flags == [False, False, True, True, False, True, False]


probabilities = st.lists(st.floats(min_value=0.0, max_value=1.0), max_size=300)


@given(probabilities, st.integers(min_value=0, max_value=300))
@settings(max_examples=200, deadline=None)
def test_a_segmenter_resumed_from_saved_state_decides_as_if_never_interrupted(
    probs: list[float], cut: int
) -> None:
    whole = decisions(segmenter(), probs)
    first = segmenter()
    head = decisions(first, probs[:cut])
    resumed = segmenter(state=copy.copy(first.state))
    assert head + decisions(resumed, probs[cut:]) == whole


@given(probabilities)
@settings(max_examples=200, deadline=None)
def test_decisions_alternate_and_respect_the_minimum_durations(probs: list[float]) -> None:
    got = decisions(segmenter(), probs)
    for n, (window, change) in enumerate(got):
        assert isinstance(change, Started if n % 2 == 0 else Stopped)
        assert change.segment == n // 2
        if isinstance(change, Started):
            first = change.start_ms // 32
            assert window - first + 1 == 3 and all(p >= 0.5 for p in probs[first : window + 1])
        else:
            last = change.end_ms // 32
            assert change.start_ms < change.end_ms and window - last + 1 == 6
            assert all(p < 0.35 for p in probs[last : window + 1])


# --- framing and resampling --------------------------------------------------------------------------


@given(st.lists(st.integers(min_value=0, max_value=1000), max_size=20), st.booleans())
def test_the_framer_cuts_any_chunking_into_the_same_whole_frames(sizes: list[int], pad: bool) -> None:
    stream = np.arange(sum(sizes), dtype=np.int64).astype(PCM)
    framer, frames, at = Framer(), [], 0
    for n in sizes:
        frames += framer.push(stream[at : at + n])
        at += n
    frames += framer.push(stream[:0], pad=pad)
    whole = len(stream) // FRAME_SAMPLES
    assert len(frames) == whole + (1 if pad and len(stream) % FRAME_SAMPLES else 0)
    assert all(len(f) == FRAME_SAMPLES for f in frames)
    joined = np.concatenate([stream[:0], *frames])
    assert np.array_equal(joined[: len(stream)] if pad else joined, stream[: len(joined)])
    assert not joined[len(stream) :].any()  # padding is silence
    assert (framer.pending == b"") == (pad or len(stream) % FRAME_SAMPLES == 0)


def test_the_framer_resumes_from_its_saved_remainder() -> None:
    stream = np.arange(1000).astype(PCM)
    first = Framer()
    head = first.push(stream[:500])
    resumed = Framer(first.pending)
    assert np.array_equal(np.concatenate(head + resumed.push(stream[500:])), stream[:960])


def test_downmix_averages_the_channels() -> None:
    stereo = np.array([100, 300, -32768, -32768, 32767, 32767], PCM)
    assert to_mono(stereo.tobytes(), 2).tolist() == [200, -32768, 32767]


def test_16k_mono_passes_through_bit_exact() -> None:
    chunk = np.random.default_rng(0).integers(-30000, 30000, 777).astype(PCM)
    assert np.array_equal(Resampler("LQ").push(chunk.tobytes(), 16000, 1), chunk)


def tone(rate: int, seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (np.sin(2 * np.pi * hz * t) * 10000).astype(PCM)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampling_keeps_the_duration_and_the_signal(rate: int) -> None:
    source = tone(rate, 1.0)
    stereo = np.repeat(source, 2)
    resampler, out = Resampler("LQ"), []
    chunk = rate // 50
    for at in range(0, len(source), chunk):
        last = at + chunk >= len(source)
        out.append(resampler.push(stereo[2 * at : 2 * (at + chunk)].tobytes(), rate, 2, last=last))
    got = np.concatenate(out)
    assert abs(len(got) - 16000) <= 1
    expected = tone(16000, len(got) / 16000)
    middle = slice(800, -800)  # away from the filter's edges
    assert np.abs(got[middle].astype(int) - expected[middle]).max() < 300


def test_a_change_of_rate_flushes_the_previous_one() -> None:
    resampler = Resampler("HQ")
    first = resampler.push(tone(48000, 0.5).tobytes(), 48000, 1)
    assert len(first) < 8000  # the filter holds back its last few ms...
    second = resampler.push(tone(16000, 0.5).tobytes(), 16000, 1)
    assert abs(len(first) + len(second) - 16000) <= 1  # ...and lets them go when the rate changes


# --- WAV files ---------------------------------------------------------------------------------------


async def test_caller_audio_stamped_long_ago_is_delivered_as_a_backlog() -> None:
    """A successor reading the recording, or a replay faster than real time, is behind the caller."""
    seen: list[bool] = []

    async def deliver(samples: np.ndarray, arrived_ns: int, last: bool, *, behind: bool = False) -> None:
        seen.append(behind)

    source = BusSource(None, IngressConfig(), deliver)  # type: ignore[arg-type]
    pcm = np.zeros(FRAME_SAMPLES, PCM).tobytes()
    now = time.time_ns()
    for sent_ns in (now, now - 2 * BACKLOG_NS):
        await source.on_media(ev.CallerAudio(session="s", pcm=pcm, sample_rate=16000, ts=sent_ns))
    assert seen == [False, True]


def test_a_wav_at_another_rate_and_channel_count_becomes_16k_mono_whole_frames(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "a.wav", np.repeat(tone(44100, 0.51), 2), 44100, channels=2)
    samples = read_wav(path)
    assert samples.dtype == PCM and len(samples) % FRAME_SAMPLES == 0
    assert len(samples) == 26 * FRAME_SAMPLES  # 0.51 s is 25.5 frames, padded to 26


def test_a_16k_mono_wav_is_read_as_is() -> None:
    assert np.array_equal(read_wav(SPEECH_WAV), speech_wav())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: write_wav(p, np.zeros(800, np.uint8), 8000, width=1), "8-bit samples"),
        (lambda p: write_wav(p, np.zeros(800, PCM), 96000), "sample rate 96000 Hz is outside"),
        (lambda p: write_wav(p, np.zeros(800, PCM), 4000), "sample rate 4000 Hz is outside"),
        (lambda p: p.write_bytes(b"ID3 not a wav at all"), "not a PCM WAV file"),
        (lambda p: p, "no such file"),
    ],
)
def test_unplayable_wav_files_are_refused_with_the_reason(tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "caller.wav"
    make(path)
    with pytest.raises(WavError, match=message) as refused:
        read_wav(path)
    assert str(path) in str(refused.value)


# --- Silero ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> SileroVad:
    return SileroVad.load()


def padded_speech() -> np.ndarray:
    silence = np.zeros(2560 * 2, PCM)  # 320 ms: the speech starts on the VAD window grid
    return np.concatenate((silence, speech_wav(), np.zeros(16000, PCM)))


async def window_probs(vad: VadStream, audio: np.ndarray) -> list[float | None]:
    return [await vad.push(audio[i : i + FRAME_SAMPLES]) for i in range(0, len(audio), FRAME_SAMPLES)]


async def test_silero_hears_the_speech_and_not_the_silence(model: SileroVad) -> None:
    audio = padded_speech()
    per_frame = await window_probs(VadStream(model), audio)
    probs = [p for p in per_frame if p is not None]
    assert len(probs) == len(audio) // 512  # one probability per 32 ms window...
    ending = [i for i, p in enumerate(per_frame) if p is not None]
    assert ending[:5] == [1, 3, 4, 6, 7]  # ...carried by the frame that ends it
    speech = slice(10, 10 + 24000 // 512)
    assert np.median(probs[speech]) > 0.9
    assert max(probs[:10]) < 0.1 and max(probs[60:]) < 0.1


async def test_a_vad_stream_restored_from_its_saved_state_goes_on_identically(model: SileroVad) -> None:
    audio = padded_speech()
    cut = 47 * FRAME_SAMPLES  # mid-speech, mid-window
    whole = await window_probs(VadStream(model), audio)
    first = VadStream(model)
    head = await window_probs(first, audio[:cut])
    state, pending = first.save()
    assert len(pending) == (cut % 512) * 2
    tail = await window_probs(VadStream(model, state=state, pending=pending), audio[cut:])
    assert head + tail == whole


def vad_batches() -> tuple[float, float]:
    """(inferences, windows) run by this process's VAD models so far."""
    samples = {s.name: s.value for s in vad_metrics.vad_batch.collect()[0].samples}
    return samples["vb_ingress_vad_batch_windows_count"], samples["vb_ingress_vad_batch_windows_sum"]


async def test_sessions_sharing_the_model_at_once_each_get_their_own_windows(model: SileroVad) -> None:
    """Windows of many calls run in one batch; each call still gets exactly what it gets alone."""
    gathering = SileroVad.load(gather_s=0.005)
    audio = padded_speech()
    streams = [audio[shift * 97 :] for shift in range(8)]  # every call off the window grid differently
    alone = [await window_probs(VadStream(model), a) for a in streams]
    runs, windows_run = vad_batches()
    together = await asyncio.gather(*(window_probs(VadStream(gathering), a) for a in streams))
    assert together == alone
    runs_after, windows_after = vad_batches()
    assert windows_after - windows_run == sum(p is not None for probs in alone for p in probs)
    assert runs_after - runs < (windows_after - windows_run) / 2  # batches, not one window at a time


WINDOW = np.zeros(512, PCM)


async def test_a_window_that_can_decide_speech_is_not_held_for_a_batch() -> None:
    """A window gathering for a batch waits; an urgent one ends the gathering for both at once."""
    model = SileroVad.load(gather_s=3600.0)
    calls = [VadStream(model) for _ in range(5)]  # three more calls, silent: the batch is never full
    # gather starts the pushes in order, each running until it has queued its window: the first one
    # is gathering when the urgent one comes
    pushes = asyncio.gather(calls[0].push(WINDOW), calls[1].push(WINDOW, urgent=True))
    done = await asyncio.wait_for(pushes, 30.0)  # not an hour: not gathered
    assert done[0] == done[1] is not None
    assert len(model.streams) == 5


async def test_a_batch_with_a_window_of_every_call_runs_at_once() -> None:
    model = SileroVad.load(gather_s=3600.0)
    alone = VadStream(model)
    assert await asyncio.wait_for(alone.push(WINDOW), 30.0) is not None  # a lone call never waits
    pair = [VadStream(model) for _ in range(2)]
    del alone
    assert len(model.streams) == 2  # a call that ended no longer counts
    probs = await asyncio.wait_for(asyncio.gather(*(call.push(WINDOW) for call in pair)), 30.0)
    assert probs[0] == probs[1] is not None


def can_decide(seg: SpeechSegmenter, windows_ahead: int) -> bool:
    """Whether some run of the next ``windows_ahead`` windows completes a start or stop."""
    for extreme in (0.0, 1.0):
        ahead = copy.deepcopy(seg)
        if ahead.push(extreme) is not None or (windows_ahead > 1 and can_decide(ahead, windows_ahead - 1)):
            return True
    return False


@given(st.lists(st.floats(0.0, 1.0), max_size=60))
def test_the_segmenter_says_when_a_decision_is_near(probs: list[float]) -> None:
    """Exactly the windows it calls deciding soon are within two windows of a possible start or stop."""
    seg = segmenter()
    for prob in probs:
        assert seg.deciding_soon == can_decide(seg, 2)
        seg.push(prob)


async def test_a_window_the_model_refuses_fails_only_its_own_session() -> None:
    state = np.zeros(STATE_SHAPE, np.float32)
    good = np.zeros(576, np.float32)
    bad = np.zeros(100, np.float32)  # not a 512-sample window with its context
    gathering = SileroVad.load(gather_s=3600.0)
    _alive = [VadStream(gathering) for _ in range(8)]  # the batch of three is never full
    batch = asyncio.gather(  # one batch: the third window ends the gathering
        gathering.infer_async(good, state),
        gathering.infer_async(bad, state),
        gathering.infer_async(good, state, urgent=True),
        return_exceptions=True,
    )
    results = await asyncio.wait_for(batch, 30.0)
    assert isinstance(results[1], Exception)
    assert [type(r) for r in (results[0], results[2])] == [tuple, tuple]
    assert results[0][0] == results[2][0]  # type: ignore[index]


def test_a_missing_model_file_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(VadModelError, match="cannot load the VAD model"):
        SileroVad.load(str(tmp_path / "missing.onnx"))


def test_without_the_silero_package_the_error_says_where_the_model_comes_from(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(vad_module, "PACKAGE", "no_such_package_here")
    with pytest.raises(VadModelError, match="pip install --no-deps silero-vad"):
        SileroVad.load()
