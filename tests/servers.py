"""Real servers as processes on free loopback ports, stopped by PID."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from infer_logger.testing import free_port


class Process:
    """A server process on a loopback port, stopped by PID."""

    def __init__(self, args: list[str], port: int, ready_path: str = "/", env: dict[str, str] | None = None,
                 log: Path | None = None) -> None:
        self.args, self.port, self.ready_path = args, port, ready_path
        self.env = {**os.environ, **(env or {})}
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Process:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args} exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=1).status_code < 500:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.args} not ready on {self.port} in {timeout}s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


def predictor_process(model: str) -> Process:
    port = free_port()
    args = [sys.executable, "-m", "infer_logger.demo.predictor", "--port", str(port), "--model", model]
    return Process(args, port)


def sidecar_process(upstream: str, tmp: Path, *extra: str, port: int | None = None,
                    env: dict[str, str] | None = None) -> Process:
    port = port or free_port()
    args = [sys.executable, "-m", "infer_logger.cli", "proxy", "--port", str(port),
            "--predictor-url", upstream, "--spool-dir", str(tmp / "spool"), *extra]
    return Process(args, port, ready_path="/readyz", env=env, log=tmp / "sidecar.log")


def scrape(proc: Process, needle: str, timeout: float = 5.0) -> str:
    """The sidecar's /metrics once it contains `needle` (a delivery child reports every 0.5 s)."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(proc.url + "/metrics").text
        if needle in text or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


class Scripted:
    """An in-loop TCP server that answers each request (head and body) with the bytes
    `reply(request)` gives, or hangs up when it gives None; for framings and failures."""

    def __init__(self, reply: Callable[[bytes], bytes | None], *, close_after: int | None = None) -> None:
        self.reply = reply
        self.close_after = close_after  # answers per connection before the server hangs up
        self.connections = 0
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        answered = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                body = await reader.readexactly(length)
                self.heads.append(head + body)
                out = self.reply(head + body)
                if out is None:  # hang up without answering
                    break
                writer.write(out)
                await writer.drain()
                answered += 1
                if self.close_after is not None and answered >= self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


def dribble(port: int, head: bytes, data: bytes, *, every: float = 0.05, bound: float = 10.0) -> bytes:
    """A slowloris client: send `head`, then `data` a byte every `every` s (round and round) until
    the server answers; what it answered, to its end of stream (AssertionError if not within `bound`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=every) as sock:
        sock.sendall(head)
        for i in range(int(bound / every)):
            sock.sendall(data[i % len(data):i % len(data) + 1])
            try:
                raw = sock.recv(65536)
            except TimeoutError:
                continue
            sock.settimeout(5)
            # A reset after the answer ends it too: a server closing with our bytes unread resets.
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    raw += chunk
            return raw
    raise AssertionError(f"no answer within {bound} s")
