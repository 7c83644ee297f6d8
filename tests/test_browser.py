"""The web page in headless Chromium against the whole system: talk, see captions, hear the agent.

Chromium (Debian's, /usr/bin/chromium) gets a fake microphone that plays a WAV of a caller's question
once; all five stages and the gateway run as processes with fast offline engines (Whisper tiny.en, a
scripted LLM, flite). The page's own measurements (connection times, audio levels over time) are read
from ``window.voicebus``; latencies are printed, not asserted.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from playwright.async_api import async_playwright

from proto import events as ev
from services.runtime.bus import Bus
from services.tools.stack import Stack, free_port
from tests.support.tap import Tap

CHROMIUM = "/usr/bin/chromium"
LOUD = 0.02  # RMS that counts as sound, in the page and here
QUESTION = "What is the weather like today?"
ANSWER = "It is sunny and warm today, with a light breeze."
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--autoplay-policy=no-user-gesture-required",
]


def caller_wav(path: Path) -> Path:
    """The caller's question (flite) after a second of silence, then silence while the agent answers."""
    spoken = path.with_suffix(".spoken.wav")
    subprocess.run(["flite", "-voice", "slt", "-t", QUESTION, "-o", str(spoken)], check=True)
    with wave.open(str(spoken), "rb") as w:
        rate = w.getframerate()
        speech = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    audio = np.concatenate((np.zeros(rate, "<i2"), speech, np.zeros(30 * rate, "<i2")))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(audio.tobytes())
    return path


async def serve_page(stack: Stack, script: Path, replies: dict[str, str]) -> str:
    """All five stages and a gateway, the LLM answering by ``replies``; returns the page's URL."""
    lines = json.dumps([{"match": match, "reply": reply} for match, reply in replies.items()])
    await asyncio.to_thread(script.write_text, lines)
    stack.env = {
        **stack.env,
        "VB_WEBRTC_HOST_ADDRESSES": "127.0.0.1",
        "VB_LLM_ENGINE": "scripted",
        "VB_LLM_SCRIPT": str(script),
        "VB_TTS_ENGINE": "flite",
    }
    port = free_port()
    processes = [stack.spawn(stage) for stage in ev.STAGES]
    processes.append(stack.spawn("gateway", env={"VB_GATEWAY_PORT": str(port)}))
    await stack.wait_ready_async(processes, timeout_s=120)
    return f"http://127.0.0.1:{port}/"


@pytest.fixture
async def system(stack: Stack, tmp_path: Path) -> str:
    return await serve_page(stack, tmp_path / "script.json", {"weather": ANSWER})


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Any]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: deploy/dev-setup.sh installs Debian's chromium")
    microphone = caller_wav(tmp_path / "caller.wav")
    async with async_playwright() as p:
        launched = await p.chromium.launch(
            executable_path=CHROMIUM,
            args=[*FLAGS, f"--use-file-for-fake-audio-capture={microphone}%noloop"],
        )
        yield launched
        await launched.close()


#: The page's receiving side of the agent's voice, from the browser's WebRTC statistics.
INBOUND_STATS = """(async () => {
  const report = await window.voicebus.legs.speaker.pc.getStats();
  const s = [...report.values()].find((s) => s.type === "inbound-rtp");
  return {
    jitter_buffer_ms: Math.round((1000 * s.jitterBufferDelay) / s.jitterBufferEmittedCount),
    jitter_ms: Math.round(1000 * s.jitter),
    packets: s.packetsReceived,
    lost: s.packetsLost,
  };
})()"""


def captioned(who: str, words: str) -> str:
    """A page expression: a caption of ``who`` (caller or agent) holds ``words``."""
    return f"[...document.querySelectorAll('.bubble.{who}')].some(b => /{words}/i.test(b.textContent))"


async def value(page: Any, expression: str) -> Any:
    return await page.evaluate(expression)


def in_order(expected: list[str], seen: list[str]) -> bool:
    """Whether ``expected`` occurs in ``seen`` in this order (other entries may come in between)."""
    rest = iter(seen)
    return all(state in rest for state in expected)


def rms(pcm: bytes) -> float:
    samples = np.frombuffer(pcm, "<i2").astype(np.float64) / 32768
    return float(np.sqrt(np.mean(samples**2)))


@pytest.mark.slow
async def test_talking_to_the_agent_from_the_page(system: str, browser: Any, bus: Bus) -> None:
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.goto(system)
    await page.click("#talk")
    await page.wait_for_function(
        "window.voicebus.legs.mic?.connected && window.voicebus.legs.speaker?.connected"
    )
    session = await value(page, "window.voicebus.session.session")
    async with Tap(bus, session) as tap:
        # the caller's words, captioned
        await page.wait_for_function(captioned("caller", "weather"), timeout=60_000)
        # the agent's reply, captioned and heard
        await page.wait_for_function(captioned("agent", "sunny and warm"), timeout=60_000)
        await page.wait_for_function("window.voicebus.levels.agent.loudMs >= 1000", timeout=60_000)
        latency = await page.wait_for_selector(".bubble.agent .latency")
        ttfa_ms = int(await latency.get_attribute("data-ms") or -1)
        await page.wait_for_function("window.voicebus.state === 'listening'", timeout=30_000)
        legs = await value(
            page,
            "JSON.stringify(window.voicebus.legs, ['mic', 'speaker', 'timing', "
            "'gather', 'answer', 'connect', 'total'])",
        )
        received = await value(page, INBOUND_STATS)
        agent = await value(page, "window.voicebus.levels.agent.history")
        states = [state for _, state in await value(page, "window.voicebus.states")]
        marks = {m.mark: m.at_ns for m in tap.of(ev.TurnMark) if m.turn == 1}
        reply = sorted(tap.agent_frames(lambda f: f.turn == 1), key=lambda f: f.index)
        await page.click("#talk")  # hang up
        ended = await tap.wait(ev.SessionEnded, timeout=20)
    assert ended[0].reason == "hangup"
    assert not errors
    # the page showed the turn's own latency, and the agent's states in the order they happened
    assert ttfa_ms == pytest.approx((marks["first_audio_out"] - marks["speech_end"]) / 1e6, abs=1)
    assert in_order(["connecting", "listening", "hearing", "thinking", "speaking", "listening"], states)
    # the egress plays the reply from first_audio_out on, 20 ms a frame: when did its first sound leave?
    first_sound = next(f.index for f in reply if rms(f.pcm) > LOUD)
    played_at = marks["first_audio_out"] / 1e9 + first_sound * 0.02
    heard_at = next(t for t, level in agent if level > LOUD) / 1000
    phases = {
        k: round((v - marks["speech_end"]) / 1e6) for k, v in sorted(marks.items(), key=lambda kv: kv[1])
    }
    print(
        f"\nbrowser: connection times (ms) {legs}; TTFA {ttfa_ms} ms; the agent's first sound heard in the "
        f"page {(heard_at - played_at) * 1000:.0f} ms after the egress played it (receiving side: "
        f"{received}); turn 1 marks, ms after the caller stopped: {phases}"
    )


LONG_ANSWER = (
    "It is sunny and warm today, with a light breeze from the west. In the afternoon a few clouds may "
    "drift in from the sea, but no rain is expected before the evening. Tonight stays mild, and the "
    "wind drops after sunset, so it is a good evening for a walk by the river."
)
INTERRUPTION = "Stop, what about tomorrow?"
NEXT_ANSWER = "Tomorrow brings rain in the morning."

#: Replaces the page's microphone with a stream the test speaks into on cue (``window.say(base64 wav)``),
#: so the caller can talk over the agent while it speaks, whatever the machine's speed. The audio still
#: goes through the browser's WebRTC stack to the ingress as it would from a microphone.
MICROPHONE_ON_CUE = """(() => {
  navigator.mediaDevices.getUserMedia = async () => {
    const context = new AudioContext({ sampleRate: 48000 });
    const line = context.createMediaStreamDestination();
    const silence = context.createConstantSource(); // a microphone never stops sending, even in silence
    silence.offset.value = 0;
    silence.connect(line);
    silence.start();
    window.say = async (b64) => {
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const buffer = await context.decodeAudioData(bytes.buffer);
      const source = context.createBufferSource();
      source.buffer = buffer;
      source.connect(line);
      source.start();
      return Date.now();
    };
    return line.stream;
  };
})()"""


def spoken_b64(text: str, path: Path) -> str:
    subprocess.run(["flite", "-voice", "slt", "-t", text, "-o", str(path)], check=True)
    return base64.b64encode(path.read_bytes()).decode()


@pytest.mark.slow
async def test_speaking_over_the_agent_stops_its_audio(stack: Stack, tmp_path: Path, bus: Bus) -> None:
    url = await serve_page(stack, tmp_path / "script.json", {"weather": LONG_ANSWER, "tomorrow": NEXT_ANSWER})
    question = await asyncio.to_thread(spoken_b64, QUESTION, tmp_path / "question.wav")
    interruption = await asyncio.to_thread(spoken_b64, INTERRUPTION, tmp_path / "interruption.wav")
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = await browser.new_page()
        await page.add_init_script(MICROPHONE_ON_CUE)
        await page.goto(url)
        await page.click("#talk")
        await page.wait_for_function(
            "window.voicebus.legs.mic?.connected && window.voicebus.legs.speaker?.connected"
        )
        session = await value(page, "window.voicebus.session.session")
        async with Tap(bus, session) as tap:
            await page.evaluate(f"window.say('{question}')")
            # the agent is well into its long answer, and the page hears it
            await page.wait_for_function("window.voicebus.levels.agent.loudMs >= 1500", timeout=90_000)
            spoke_at_ms = await page.evaluate(f"window.say('{interruption}')")
            stopped = await tap.wait(ev.PlayoutStopped, where=lambda s: s.turn == 1, timeout=30)
            await page.wait_for_function(captioned("caller", "tomorrow"), timeout=60_000)
            await page.wait_for_function(captioned("agent", "rain in the morning"), timeout=60_000)
            marks = await tap.wait(
                ev.TurnMark, where=lambda m: m.turn == 2 and m.mark == "first_audio_out", timeout=30
            )
            agent = await value(page, "window.voicebus.levels.agent.history")
            unheard = await value(page, "document.querySelector('.bubble.agent .unheard')?.textContent ?? ''")
            paused = tap.of(ev.PlayoutPaused, where=lambda e: e.turn == 1)
        await browser.close()
    cut = stopped[0]
    # the first reply was cut where the caller spoke: only a beginning of it was heard, the rest dropped
    assert not cut.completed
    assert cut.heard_text and LONG_ANSWER.startswith(cut.heard_text.rstrip(" ,."))
    assert len(cut.heard_text) < len(LONG_ANSWER) // 2
    assert unheard.strip() and LONG_ANSWER.endswith(unheard.strip())
    # once the egress stopped the old reply, the page heard nothing more of it: silence until the next one
    # (the margin covers the network and the page's jitter buffer, a few tens of ms here)
    silenced_ms = min([cut.ts, *(e.ts for e in paused)]) / 1e6
    next_reply_ms = marks[0].at_ns / 1e6
    tail = [level for t, level in agent if silenced_ms + 500 <= t < next_reply_ms]
    assert tail and max(tail) <= LOUD, "the cut reply went on playing in the page"
    last_heard = max(
        (t for t, level in agent if spoke_at_ms <= t < next_reply_ms and level > LOUD), default=0
    )
    print(
        f"\nbrowser barge-in: the egress silenced the agent {silenced_ms - spoke_at_ms:.0f} ms and the page "
        f"last heard it {last_heard - spoke_at_ms} ms after the caller began to speak (flite's lead-in "
        f"included); heard {len(cut.heard_text)} of {len(LONG_ANSWER)} characters"
    )
