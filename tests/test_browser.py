"""The web page in headless Chromium against the whole system: talk, see captions, hear the agent.

Chromium (Debian's, /usr/bin/chromium) gets a fake microphone that plays a WAV of a caller's question
once; all five stages and the gateway run as processes with fast offline engines (Whisper tiny.en, a
scripted LLM, flite). The page's own measurements (connection times, audio levels over time) are read
from ``window.voicebus``; latencies are printed, not asserted.
"""

from __future__ import annotations

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


@pytest.fixture
async def system(stack: Stack, tmp_path: Path) -> AsyncIterator[str]:
    """All five stages and a gateway; yields the page's URL."""
    script = tmp_path / "script.json"
    script.write_text(json.dumps([{"match": "weather", "reply": ANSWER}]))
    env = {
        "VB_WEBRTC_HOST_ADDRESSES": "127.0.0.1",
        "VB_LLM_ENGINE": "scripted",
        "VB_LLM_SCRIPT": str(script),
        "VB_TTS_ENGINE": "flite",
    }
    stack.env = {**stack.env, **env}
    port = free_port()
    processes = [stack.spawn(stage) for stage in ev.STAGES]
    processes.append(stack.spawn("gateway", env={"VB_GATEWAY_PORT": str(port)}))
    await stack.wait_ready_async(processes, timeout_s=120)
    yield f"http://127.0.0.1:{port}/"


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
        reply = sorted(tap.of(ev.AgentAudioFrame, where=lambda f: f.turn == 1), key=lambda f: f.index)
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
