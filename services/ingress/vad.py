"""Silero VAD through onnxruntime: one model per process, one recurrent state per session.

The model ships inside faster-whisper (``assets/silero_vad_v6.onnx``): it takes 512 new samples at
16 kHz plus the 64 samples before them, and an LSTM state as ``h`` and ``c`` (1, 1, 128 each), and
returns the window's speech probability. Inference runs on one dedicated thread (onnxruntime releases
the GIL), so the event loop never waits on it and sessions share the model without contention. The
thread takes every window waiting when it wakes and hands the results back to the loop in one call:
with many calls, one wake-up serves many windows (an executor future per window cost as much CPU as a
third of the inference itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import queue
import threading
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from services.ingress import metrics
from services.ingress.audio import PCM, Samples
from services.ingress.segmenter import WINDOW_SAMPLES

CONTEXT_SAMPLES = 64
STATE_SHAPE = (1, 1, 128)
INPUTS = {"input", "h", "c"}
Floats = npt.NDArray[np.float32]
Result = tuple[float, Floats, Floats]
Request = tuple[Floats, Floats, Floats, asyncio.Future[Result]]
Answer = tuple[asyncio.Future[Result], Result | Exception]


class VadModelError(RuntimeError):
    """The VAD model cannot be loaded or does not have the inputs this code feeds."""


def packaged_model() -> Path:
    """The Silero model file inside the faster-whisper package."""
    return Path(str(importlib.resources.files("faster_whisper") / "assets" / "silero_vad_v6.onnx"))


class SileroVad:
    """The loaded model and the thread that runs it; shared by every session of the process."""

    def __init__(self, path: Path) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own untyped errors for missing or bad files
            raise VadModelError(f"cannot load the VAD model {path}: {e}") from e
        names = {i.name for i in self._session.get_inputs()}
        if names != INPUTS:
            raise VadModelError(f"{path}: inputs {sorted(names)}, expected {sorted(INPUTS)} (Silero v6)")
        zeros = np.zeros(STATE_SHAPE, np.float32)
        self.infer(np.zeros((1, CONTEXT_SAMPLES + WINDOW_SAMPLES), np.float32), zeros, zeros)  # warm up
        self._requests: queue.SimpleQueue[Request] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="vad", daemon=True).start()

    @classmethod
    def load(cls, path: str = "") -> SileroVad:
        """The model at ``path``, or the packaged one."""
        return cls(Path(path) if path else packaged_model())

    def infer(self, x: Floats, h: Floats, c: Floats) -> Result:
        """One window (with its context) through the model; blocking, so call it off the event loop."""
        started = time.perf_counter()
        prob, h, c = self._session.run(None, {"input": x, "h": h, "c": c})
        metrics.vad_inference.observe(time.perf_counter() - started)
        return float(np.clip(prob.reshape(-1)[0], 0.0, 1.0)), h, c

    async def infer_async(self, x: Floats, h: Floats, c: Floats) -> Result:
        """``infer`` on the model's thread."""
        done: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._requests.put((x, h, c, done))
        return await done

    def _serve(self) -> None:
        """The model's thread: run every window waiting, then answer each loop once for all of them."""
        while True:
            batch = [self._requests.get()]
            while not self._requests.empty():
                batch.append(self._requests.get_nowait())
            answers: dict[asyncio.AbstractEventLoop, list[Answer]] = {}
            for x, h, c, done in batch:
                try:
                    result: Result | Exception = self.infer(x, h, c)
                except Exception as e:  # onnxruntime's errors are untyped; only this window's session fails
                    result = e
                answers.setdefault(done.get_loop(), []).append((done, result))
            for loop, results in answers.items():
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits there
                    loop.call_soon_threadsafe(_answer, results)


def _answer(results: list[Answer]) -> None:
    for done, result in results:
        if done.done():  # its session stopped waiting (cancelled)
            continue
        if isinstance(result, Exception):
            done.set_exception(result)
        else:
            done.set_result(result)


class VadStream:
    """One session's VAD: collects 20 ms frames into 32 ms windows and keeps the model state between them."""

    def __init__(self, model: SileroVad, *, state: bytes = b"", pending: bytes = b"") -> None:
        self.model = model
        if state:
            saved = np.frombuffer(state, np.float32)
            size = STATE_SHAPE[-1]
            self._h = saved[:size].reshape(STATE_SHAPE).copy()
            self._c = saved[size : 2 * size].reshape(STATE_SHAPE).copy()
            self._context = saved[2 * size :].copy()
        else:
            self._h = np.zeros(STATE_SHAPE, np.float32)
            self._c = np.zeros(STATE_SHAPE, np.float32)
            self._context = np.zeros(CONTEXT_SAMPLES, np.float32)
        self._pending: Samples = np.frombuffer(pending, PCM).copy()

    async def push(self, frame: Samples) -> float | None:
        """The speech probability of the window this frame completes, or None if it completes none."""
        buffered = np.concatenate((self._pending, frame))
        if len(buffered) < WINDOW_SAMPLES:
            self._pending = buffered
            return None
        window = buffered[:WINDOW_SAMPLES].astype(np.float32) / 32768.0
        x = np.concatenate((self._context, window))[np.newaxis, :]
        prob, h, c = await self.model.infer_async(x, self._h, self._c)
        # state changes only once the window is through, so a cancelled push leaves it consistent
        self._h, self._c, self._context = h, c, window[-CONTEXT_SAMPLES:]
        self._pending = buffered[WINDOW_SAMPLES:]
        return prob

    def save(self) -> tuple[bytes, bytes]:
        """The recurrent state with the context (float32), and the samples of the window in progress."""
        state = np.concatenate((self._h.reshape(-1), self._c.reshape(-1), self._context))
        return state.astype(np.float32).tobytes(), self._pending.tobytes()
