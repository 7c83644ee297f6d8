"""Run a local voicebus: a nats-server with JetStream and the stage processes, each its own OS process.

Used by ``voicebus up`` and ``voicebus demo``, by the tests (which kill and restart parts of it) and by
the benchmarks. Processes are started with ``python -m services <stage>`` and the environment of the
stack (NATS URL, a free HTTP port each, replica id), and are ready when their ``/readyz`` says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from proto.events import STAGES

NATS_BINARY = "nats-server"


def nats_binary() -> str | None:
    """The nats-server next to this Python (the dev extra's 2.10, as deployed), else one on the PATH."""
    beside = Path(sys.executable).parent / NATS_BINARY
    if beside.is_file():
        return str(beside)
    return shutil.which(NATS_BINARY) or shutil.which(NATS_BINARY, path="/usr/sbin:/usr/local/bin")


def wait_port(port: int, timeout_s: float = 10.0) -> None:
    """Block until something accepts TCP connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


#: Ports this process handed out: two processes of one stack must never be given the same one.
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port nothing listens on now, below the kernel's ephemeral range (32768 and up).

    A port from the ephemeral range can be taken by any process's outgoing connection (a stage's
    NATS connection) between this check and the bind of the process it is meant for.
    """
    for _ in range(1000):
        port = random.randrange(20_000, 32_000)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free TCP port between 20000 and 32000")


class NatsServer:
    """A local nats-server with JetStream on a free port, which can be killed and started again.

    It runs with one Go thread (``GOMAXPROCS=1``), as deployed with one core's request: on two cores
    shared with the stages, more threads cost wake-ups for each message handed between goroutines.
    """

    GO_THREADS = "1"

    def __init__(self, port: int = 0, store_dir: str | None = None, config: str | None = None) -> None:
        binary = nats_binary()
        if binary is None:
            raise RuntimeError("nats-server is not installed (`just setup` puts it in .venv/bin)")
        self.binary = binary
        self.port = port or free_port()
        self._own_dir = store_dir is None
        self.store_dir = store_dir or tempfile.mkdtemp(prefix="vb-nats-")
        self.config = config
        self.log_path = os.path.join(tempfile.gettempdir(), f"vb-nats-{self.port}.log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Client URL of the server."""
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and wait until it accepts connections (its log goes to ``log_path``)."""
        args = [self.binary, "-a", "127.0.0.1", "-p", str(self.port)]
        # a configuration file brings its own JetStream block
        args += ["-c", self.config] if self.config else ["-js", "-sd", self.store_dir]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "GOMAXPROCS": self.GO_THREADS}
            )
        try:
            wait_port(self.port, timeout_s)
        except TimeoutError:
            tail = Path(self.log_path).read_text(errors="replace")[-2000:]
            raise RuntimeError(f"nats-server did not start (exit {self.proc.poll()}): {tail}") from None

    def kill(self) -> None:
        """SIGKILL the server (JetStream data stays in the store directory)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def freeze(self, frozen: bool = True) -> None:
        """Stop (SIGSTOP) or resume (SIGCONT) the server: connections stay open, nothing is answered."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP if frozen else signal.SIGCONT)

    def stop(self) -> None:
        """Stop the server and remove a store directory it created."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._own_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)


@dataclass
class StageProcess:
    """One replica of a stage running as its own process."""

    stage: str
    replica: str
    http_port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    def ready(self) -> bool:
        """Whether /readyz answers 200."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/readyz", timeout=0.5) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    @property
    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None


@dataclass
class Stack:
    """Stage processes sharing one NATS URL and one environment."""

    nats_url: str
    env: Mapping[str, str] = field(default_factory=dict)
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="vb-logs-")))
    processes: list[StageProcess] = field(default_factory=list)

    def spawn(
        self,
        stage: str,
        replica: str | None = None,
        env: Mapping[str, str] | None = None,
        module: str = "services",
    ) -> StageProcess:
        """Start one replica of ``stage`` (``python -m <module> <stage>``); does not wait for it."""
        replica = replica or f"{stage}-{sum(p.stage == stage for p in self.processes)}"
        port = free_port()
        full_env = {
            **os.environ,
            **self.env,
            **(env or {}),
            "VB_NATS_URL": self.nats_url,
            "VB_HTTP_PORT": str(port),
            "VB_HTTP_HOST": "127.0.0.1",
            "VB_REPLICA_ID": replica,
            "PYTHONUNBUFFERED": "1",
        }
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{replica}.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, stage], env=full_env, stdout=out, stderr=subprocess.STDOUT
            )
        process = StageProcess(stage, replica, port, proc, log_path)
        self.processes.append(process)
        return process

    def start(self, stages: Iterable[str] = STAGES, replicas: int = 1, timeout_s: float = 60.0) -> None:
        """Start ``replicas`` of each stage and wait until all are ready."""
        started = [self.spawn(stage) for stage in stages for _ in range(replicas)]
        self.wait_ready(started, timeout_s)

    def wait_ready(self, processes: Iterable[StageProcess], timeout_s: float = 60.0) -> None:
        """Block until every process answers /readyz, or raise with the log tail of the one that did not."""
        deadline = time.monotonic() + timeout_s
        for p in processes:
            while not (p.ready() and p.alive):  # a dead one's port may be answered by another process
                if not p.alive or time.monotonic() > deadline:
                    tail = p.log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{p.replica} not ready (exit {p.proc.poll()}):\n{tail}")
                time.sleep(0.05)

    async def wait_ready_async(self, processes: Iterable[StageProcess], timeout_s: float = 60.0) -> None:
        """``wait_ready`` without blocking the event loop."""
        await asyncio.to_thread(self.wait_ready, list(processes), timeout_s)

    def of(self, stage: str) -> list[StageProcess]:
        """Running replicas of ``stage``."""
        return [p for p in self.processes if p.stage == stage and p.alive]

    def kill(self, process: StageProcess, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` and wait for the process to exit; returns its exit code."""
        process.proc.send_signal(sig)
        return process.proc.wait(timeout=60)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM every process (they drain), SIGKILL what is left after ``timeout_s``."""
        for p in self.processes:
            if p.alive:
                p.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in self.processes:
            try:
                p.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait()
