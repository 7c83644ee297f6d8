"""A nats-server for tests: a container when a Docker engine answers, the local binary otherwise.

Both can be killed and started again on the same port with their JetStream data kept, which is what
the reconnect and failover tests need.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess

from services.tools.stack import NatsServer, free_port

IMAGE = "nats:2.10-alpine"


def docker_engine() -> bool:
    """Whether a Docker engine (not just the client) is reachable."""
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class ContainerNats:
    """nats-server in a container (testcontainers), on a fixed host port so restarts keep the URL."""

    def __init__(self) -> None:
        from testcontainers.core.container import DockerContainer

        self.port = free_port()
        self.container = (
            DockerContainer(IMAGE)
            .with_command("-js -sd /data")
            .with_bind_ports(4222, self.port)
            .with_env("GOMAXPROCS", NatsServer.GO_THREADS)
        )

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        if getattr(self.container, "_container", None) is None:
            self.container.start()
        else:
            self.container.get_wrapped_container().start()
        from services.tools.stack import wait_port

        wait_port(self.port)

    def kill(self) -> None:
        self.container.get_wrapped_container().kill()

    def freeze(self, frozen: bool = True) -> None:
        container = self.container.get_wrapped_container()
        container.pause() if frozen else container.unpause()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.container.stop()


def make_server() -> NatsServer | ContainerNats:
    """The server kind this machine supports."""
    return ContainerNats() if docker_engine() else NatsServer()
