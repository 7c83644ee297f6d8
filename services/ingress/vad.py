"""Silero VAD through onnxruntime: one model per process, one recurrent state per session.

The model is Silero's own 16 kHz ONNX export (``silero_vad_16k_op15.onnx`` inside the silero-vad
package, installed without its torch dependency): it takes 512 new samples plus the 64 before them
and a recurrent state of shape (2, batch, 128), and returns each window's speech probability.
Windows of different calls go through it as one batch: a batch of 16 costs as much as six windows
one by one (37 against 92 us a window here), and each window's result is bit-identical to its own run.

Inference runs on one dedicated thread (onnxruntime releases the GIL), so the event loop never waits
on it. The thread gathers windows for up to ``gather_s`` after the first one comes, runs them in one
batch, and hands each event loop its results in one call. Gathering ends early when every stream of
the process has a window waiting (a lone call never waits), and at once for an ``urgent`` window:
one within two windows of a possible speech start or stop, so the decisions a turn and a barge-in
wait on are not held back, or one of audio that is behind (a backlog to catch up on). The others
reach the bus at most ``gather_s`` later.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import queue
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from services.ingress import metrics
from services.ingress.audio import PCM, Samples
from services.ingress.segmenter import WINDOW_SAMPLES

CONTEXT_SAMPLES = 64
STATE_SHAPE = (2, 1, 128)
INPUTS = {"input", "state", "sr"}
SAMPLE_RATE = np.array(16_000, np.int64)
PACKAGE, PACKAGED_FILE = "silero_vad", Path("data") / "silero_vad_16k_op15.onnx"
Floats = npt.NDArray[np.float32]
#: A window's speech probability and the session's recurrent state after it.
Result = tuple[float, Floats]
Request = tuple[Floats, Floats, asyncio.Future[Result]]
Answer = tuple[asyncio.Future[Result], Result | Exception]


class VadModelError(RuntimeError):
    """The VAD model cannot be loaded or does not have the inputs this code feeds."""


def packaged_model() -> Path:
    """The Silero model file inside the silero-vad package (found without importing it: that needs torch)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise VadModelError(
            "the Silero VAD model comes from the silero-vad package: "
            "pip install --no-deps silero-vad==6.2.3, or set VB_INGRESS_VAD_MODEL to a model file"
        )
    return Path(next(iter(spec.submodule_search_locations))) / PACKAGED_FILE


class SileroVad:
    """The loaded model and the thread that runs it; shared by every session of the process."""

    def __init__(self, path: Path, gather_s: float = 0.0) -> None:
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
            raise VadModelError(
                f"{path}: inputs {sorted(names)}, expected {sorted(INPUTS)} (Silero's ONNX export)"
            )
        self.gather_s = gather_s
        self.infer(
            np.zeros((1, CONTEXT_SAMPLES + WINDOW_SAMPLES), np.float32), np.zeros(STATE_SHAPE, np.float32)
        )
        self._requests: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._run_now = threading.Event()
        #: The streams alive: a batch with a window of each cannot grow.
        self.streams: weakref.WeakSet[VadStream] = weakref.WeakSet()
        threading.Thread(target=self._serve, name="vad", daemon=True).start()

    @classmethod
    def load(cls, path: str = "", gather_s: float = 0.0) -> SileroVad:
        """The model at ``path``, or the packaged one."""
        return cls(Path(path) if path else packaged_model(), gather_s)

    def infer(self, x: Floats, state: Floats) -> tuple[Floats, Floats]:
        """Windows (batch, 576) and their states (2, batch, 128) through the model; blocking."""
        started = time.perf_counter()
        probs, state = self._session.run(None, {"input": x, "state": state, "sr": SAMPLE_RATE})
        metrics.vad_inference.observe(time.perf_counter() - started)
        metrics.vad_batch.observe(len(x))
        return np.clip(probs[:, 0], 0.0, 1.0), state

    async def infer_async(self, x: Floats, state: Floats, *, urgent: bool = False) -> Result:
        """One window (576 samples with its context) on the model's thread, in the next batch."""
        done: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._requests.put((x, state, done))
        if urgent or self._requests.qsize() + 1 >= len(self.streams):  # +1: the one the thread holds
            self._run_now.set()
        return await done

    def _serve(self) -> None:
        """The model's thread: gather windows, run them together, answer each loop once for all of them."""
        while True:
            batch = [self._requests.get()]
            self._run_now.wait(self.gather_s)
            self._run_now.clear()  # a window queued from here on may set it again
            while not self._requests.empty():
                batch.append(self._requests.get_nowait())
            answers: dict[asyncio.AbstractEventLoop, list[Answer]] = {}
            for (_, _, done), result in zip(batch, self._run(batch), strict=True):
                answers.setdefault(done.get_loop(), []).append((done, result))
            for loop, results in answers.items():
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits there
                    loop.call_soon_threadsafe(_answer, results)

    def _run(self, batch: list[Request]) -> list[Result | Exception]:
        """The batch in one inference; if the model refuses it, each window alone, so only a bad one fails."""
        try:
            probs, state = self.infer(
                np.stack([x for x, _, _ in batch]), np.concatenate([s for _, s, _ in batch], axis=1)
            )
        except Exception as e:  # onnxruntime's errors are untyped
            if len(batch) == 1:
                return [e]
            return [result for request in batch for result in self._run([request])]
        return [(float(probs[i]), state[:, i : i + 1]) for i in range(len(batch))]


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
        model.streams.add(self)
        size = int(np.prod(STATE_SHAPE))
        if state:
            saved = np.frombuffer(state, np.float32)
            self._state = saved[:size].reshape(STATE_SHAPE).copy()
            self._context = saved[size:].copy()
        else:
            self._state = np.zeros(STATE_SHAPE, np.float32)
            self._context = np.zeros(CONTEXT_SAMPLES, np.float32)
        self._pending: Samples = np.frombuffer(pending, PCM).copy()

    async def push(self, frame: Samples, *, urgent: bool = False) -> float | None:
        """The speech probability of the window this frame completes, or None if it completes none.

        ``urgent``: the window is not to be held for a batch (it can decide a speech start or stop, or
        the audio is behind).
        """
        buffered = np.concatenate((self._pending, frame))
        if len(buffered) < WINDOW_SAMPLES:
            self._pending = buffered
            return None
        window = buffered[:WINDOW_SAMPLES].astype(np.float32) / 32768.0
        prob, state = await self.model.infer_async(
            np.concatenate((self._context, window)), self._state, urgent=urgent
        )
        # state changes only once the window is through, so a cancelled push leaves it consistent
        self._state, self._context = state, window[-CONTEXT_SAMPLES:]
        self._pending = buffered[WINDOW_SAMPLES:]
        return prob

    def save(self) -> tuple[bytes, bytes]:
        """The recurrent state with the context (float32), and the samples of the window in progress."""
        state = np.concatenate((self._state.reshape(-1), self._context))
        return state.astype(np.float32).tobytes(), self._pending.tobytes()
