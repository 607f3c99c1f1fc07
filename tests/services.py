"""Kafka- and Elasticsearch-protocol servers for integration tests (noida-db from PyPI).

Each is the real binary on a free loopback port with a fresh data dir, stopped by PID. When
`KAFKA_BOOTSTRAP` or `ES_URL` is set, tests run against that server instead (e.g. the
real Kafka and Elasticsearch 8 in containers), unchanged.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import httpx

from infer_logger.testing import free_port


def noida_binary() -> Path:
    return Path(str(files("noida_db") / "noida-db"))


def stopped(pid: int) -> bool:
    """Every thread of `pid` stopped (SIGSTOP takes hold of a thread only when it next runs)."""
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:  # a thread that just ended
            continue
        states.append(stat[stat.rindex(")") + 2])  # the state follows "(comm)", which may hold ")"
    return bool(states) and all(state in "Tt" for state in states)


class NoidaServer:
    """One noida-db service (`kafka` or `elasticsearch`); `stop()`/`start()` again keep the port."""

    def __init__(self, service: str, port: int | None = None) -> None:
        self.service = service
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.data_dir: str | None = None

    @property
    def address(self) -> str:
        if self.service == "kafka":
            return f"127.0.0.1:{self.port}"
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0, *, fresh: bool = True) -> NoidaServer:
        if self.proc is not None and self.proc.poll() is None:  # a second one would leak the first
            raise RuntimeError(f"noida-db {self.service} already runs on {self.port}: stop() it first")
        if fresh or self.data_dir is None:
            self.data_dir = tempfile.mkdtemp(prefix=f"noida-{self.service}-")
        args = [str(noida_binary()), "start", "--only", self.service, "--host", "127.0.0.1",
                f"--{self.service}-port", str(self.port), "--data-dir", self.data_dir]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"noida-db {self.service} exited with {self.proc.returncode}")
            if self.ready():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"noida-db {self.service} not ready on {self.port} in {timeout}s")

    def ready(self) -> bool:
        if self.service == "elasticsearch":
            try:
                return httpx.get(self.address + "/_cluster/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        try:  # the port first: librdkafka prints every refused connect to stderr
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        try:
            AdminClient({"bootstrap.servers": self.address,
                         "logger": logging.getLogger("tests.services.librdkafka")}).list_topics(timeout=1)
            return True
        except KafkaException:  # the port is up, the broker not yet
            return False

    def pause(self, timeout: float = 10.0) -> None:
        """Freeze the server (SIGSTOP): the kernel still takes its connections and requests, it
        answers none. Returns once every thread of it is stopped: the signal stops a process
        only when one of its threads next runs, and until then (a busy machine) the others
        still serve requests."""
        assert self.proc is not None and self.proc.poll() is None, "pause() a running server"
        self.proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while not stopped(self.proc.pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"noida-db {self.service} on {self.port} not stopped {timeout}s after SIGSTOP")
            time.sleep(0.005)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)


    def stop(self, *, keep_data: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.send_signal(signal.SIGCONT)  # a paused server takes the SIGTERM once continued
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if not keep_data and self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None


def external(name: str) -> str | None:
    """A real server's address given in the environment (KAFKA_BOOTSTRAP, ES_URL), if any."""
    return os.environ.get(name) or None
