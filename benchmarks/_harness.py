"""Shared plumbing of the benchmarks: server processes by PID, free ports, readiness, wrk, metrics.

Everything listens on and talks to 127.0.0.1 only. Every wait is bounded by a deadline; every
process started here is stopped by its own PID (SIGTERM, then SIGKILL after a grace period), also
when the benchmark is interrupted.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PYTHON = sys.executable
BODY = b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}'
MODEL_NAMES = {"echo": "echo", "iris": "iris"}

_handed_out: set[int] = set()
_live: list[Proc] = []


def log(msg: str) -> None:
    print(msg, flush=True)


def free_port() -> int:
    """A port nothing listens on now (and that this run has not handed out before)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port found")


# -- processes ------------------------------------------------------------------------------


class Proc:
    """One server process, started in its own session, stopped by its PID."""

    def __init__(self, name: str, argv: Sequence[str], *, log_path: Path, cwd: Path | None = None,
                 cpus: str | None = None, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.cwd = cwd
        self.cpus = cpus
        self.env = env
        self.popen: subprocess.Popen[bytes] | None = None
        self.url = ""  # its base URL, once started

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> Proc:
        argv = (["taskset", "-c", self.cpus] if self.cpus else []) + self.argv  # taskset execs: same PID
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(self.log_path, "ab") as out:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          cwd=self.cwd, env=env, start_new_session=True)
        _live.append(self)
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, grace: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, sig)
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
            except ProcessLookupError:
                pass
        if self in _live:
            _live.remove(self)
        return self.popen.returncode

    def kill9(self) -> None:
        assert self.popen is not None
        os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)
        if self in _live:
            _live.remove(self)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def rss_bytes(self) -> int | None:
        """VmRSS from /proc/<pid>/status (psutil is not needed), its children's included (the
        sidecar's delivery process)."""
        own = _rss(self.pid)
        if own is None:
            return None
        return own + sum(_rss(pid) or 0 for pid, _, ppid, _ in proc_stats() if ppid == self.pid)


def _rss(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmRSS:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else None


def stop_all() -> None:
    for proc in reversed(list(_live)):
        try:
            proc.stop(grace=5)
        except Exception as exc:  # noqa: BLE001 - cleanup must go on
            print(f"warning: could not stop {proc.name} (pid {proc.pid}): {exc}", file=sys.stderr)


def _on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def install_cleanup() -> None:
    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, _on_signal)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(url: str, proc: Proc, timeout: float = 60.0) -> float:
    """Poll `url` until it answers 200; returns seconds waited. Fails early if the process died."""
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode if proc.popen else '?'}):\n"
                               f"{proc.tail()}")
        try:
            status, _ = http_get(url, timeout=1.0)
            if status == 200:
                return time.monotonic() - started
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} not ready at {url} after {timeout:g}s:\n{proc.tail()}")


# -- the servers ------------------------------------------------------------------------------


def start_predictor(model: str, workdir: Path, cpus: str | None = None) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(f"predictor-{model}", [PYTHON, "-m", "infer_logger.demo.predictor", "--model", model,
                                       "--host", HOST, "--port", str(port)],
                log_path=workdir / f"predictor-{model}-{port}.log", cwd=workdir, cpus=cpus).start()
    url = f"http://{HOST}:{port}"
    wait_ready(url + "/", proc, timeout=90)
    return proc, url


def start_sidecar(predictor_url: str, spool_dir: Path, workdir: Path, *, port: int | None = None,
                  log_urls: Sequence[str] = (), config: Path | None = None, cpus: str | None = None,
                  name: str = "sidecar") -> tuple[Proc, str]:
    port = port or free_port()
    argv = [PYTHON, "-m", "infer_logger.cli", "proxy", "--host", HOST, "--port", str(port),
            "--predictor-url", predictor_url, "--spool-dir", str(spool_dir), "--log-level", "warning"]
    for url in log_urls:
        argv += ["--log-url", url]
    if config is not None:
        argv += ["-c", str(config)]
    proc = Proc(name, argv, log_path=workdir / f"{name}-{port}.log", cwd=workdir, cpus=cpus).start()
    url = f"http://{HOST}:{port}"
    wait_ready(url + "/readyz", proc, timeout=60)
    return proc, url


def start_receiver(workdir: Path, *, port: int | None = None, ids_file: Path | None = None,
                   cpus: str | None = None) -> tuple[Proc, str]:
    port = port or free_port()
    argv = [PYTHON, str(BENCH_DIR / "receiver.py"), "--host", HOST, "--port", str(port)]
    if ids_file is not None:
        argv += ["--ids-file", str(ids_file)]
    proc = Proc("receiver", argv, log_path=workdir / f"receiver-{port}.log", cwd=workdir, cpus=cpus).start()
    url = proc.url = f"http://{HOST}:{port}/"
    wait_ready(url + "count", proc, timeout=30)
    return proc, url


NGINX_CONF = """\
daemon off;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy_temp;
    fastcgi_temp_path {dir}/fastcgi_temp;
    uwsgi_temp_path {dir}/uwsgi_temp;
    scgi_temp_path {dir}/scgi_temp;
    keepalive_requests 1000000;
    upstream predictor {{
        server {upstream};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen {host}:{port};
        location / {{
            proxy_pass http://predictor;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }}
    }}
}}
"""


WRK, NGINX = "/usr/bin/wrk", "/usr/sbin/nginx"


def missing_tools(*tools: str) -> str | None:
    """A one-line reason when a tool a benchmark runs is not installed (it was a traceback once
    the servers ran), else None."""
    missing = [tool for tool in tools if not os.access(tool, os.X_OK)]
    if not missing:
        return None
    return f"{' and '.join(missing)} not found (Debian: apt-get install wrk nginx-light)"


def start_nginx(predictor_url: str, workdir: Path, *, workers: str = "1",
                cpus: str | None = None) -> tuple[Proc, str]:
    port = free_port()
    ndir = workdir / f"nginx-{port}"
    ndir.mkdir(parents=True, exist_ok=True)
    conf = ndir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(workers=workers, dir=ndir, host=HOST, port=port,
                                      upstream=predictor_url.split("://", 1)[1]))
    proc = Proc("nginx", [NGINX, "-p", str(ndir), "-e", str(ndir / "nginx-error.log"),
                          "-c", str(conf)], log_path=ndir / "stdout.log", cpus=cpus).start()
    url = f"http://{HOST}:{port}"
    wait_ready(url + "/", proc, timeout=20)
    return proc, url


# -- metrics ------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value} (samples only)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            try:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
            except ValueError:
                pass
    return out


def metric_sum(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def scrape(base_url: str, timeout: float = 5.0) -> dict[str, float]:
    status, body = http_get(base_url + "/metrics", timeout=timeout)
    if status != 200:
        raise RuntimeError(f"{base_url}/metrics answered {status}")
    return parse_metrics(body.decode())


def wait_sink_caught_up(base_url: str, timeout: float) -> tuple[float, bool]:
    """Wait until the sinks' lag is 0 bytes; returns (seconds waited, caught up?)."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        try:
            lag = metric_sum(scrape(base_url), "infer_logger_sink_lag_bytes")
        except (OSError, RuntimeError, urllib.error.URLError):
            lag = -1
        if lag == 0:
            return time.monotonic() - started, True
        if time.monotonic() >= deadline:
            return time.monotonic() - started, False
        time.sleep(0.1)


# -- wrk ----------------------------------------------------------------------------------------

# wrk's `done` hook printing one JSON line the harness parses; a format template ({{ }} escaped).
WRK_DONE_LUA = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {{"requests": %d, "duration_us": %d, "bytes": %d, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "mean_us": %.1f, "max_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d}}\\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency.mean, latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""

WRK_LUA = """\
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
{extra}
""" + WRK_DONE_LUA


def write_wrk_script(path: Path, *, skip_logging: bool = False) -> Path:
    extra = 'wrk.headers["x-skip-logging"] = "true"' if skip_logging else ""
    path.write_text(WRK_LUA.format(body=BODY.decode(), extra=extra))
    return path


def run_wrk(url: str, script: Path, *, connections: int, duration: float, threads: int = 1,
            cpus: str | None = None) -> dict[str, Any]:
    threads = max(1, min(threads, connections))
    argv = (["taskset", "-c", cpus] if cpus else []) + [
        WRK, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
        "--timeout", "10s", "-s", str(script), url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    m = re.search(r"^WRK_JSON (\{.*\})$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-2000:]} {done.stderr[-2000:]}")
    raw = json.loads(m.group(1))
    secs = raw["duration_us"] / 1e6
    errors = raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    return {
        "requests": raw["requests"],
        "seconds": round(secs, 3),
        "rps": round(raw["requests"] / secs, 1) if secs else 0.0,
        "ok_rps": round((raw["requests"] - raw["status"]) / secs, 1) if secs else 0.0,
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "mean_ms": round(raw["mean_us"] / 1000, 3),
        "max_ms": raw["max_us"] / 1000,
        "non_2xx": raw["status"],
        "socket_errors": errors,
    }


# -- the machine --------------------------------------------------------------------------------


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over `seconds` (from /proc/stat)."""

    def read() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    t1, i1 = read()
    time.sleep(seconds)
    t2, i2 = read()
    return 1.0 - (i2 - i1) / max(1, t2 - t1)


def proc_stats() -> list[tuple[int, str, int, int]]:
    """(pid, name, ppid, user+system clock ticks) of every process, from /proc/<pid>/stat."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.find("(") + 1 : stat.rfind(")")]
        rest = stat[stat.rfind(")") + 2 :].split()
        out.append((int(d.name), name, int(rest[1]), int(rest[11]) + int(rest[12])))
    return out


def top_other_processes(exclude: set[int], limit: int = 3) -> list[str]:
    """The busiest processes by cumulative CPU in a 1 s window, outside `exclude` (a noise hint)."""

    def ticks() -> dict[int, tuple[int, str]]:
        return {pid: (cpu, name) for pid, name, _, cpu in proc_stats()}

    a = ticks()
    time.sleep(1.0)
    b = ticks()
    hz = os.sysconf("SC_CLK_TCK")
    busy = []
    for pid, (t, name) in b.items():
        if pid in exclude or pid == os.getpid():
            continue
        delta = t - a.get(pid, (t, name))[0]
        if delta > 0:
            busy.append((delta / hz, pid, name))
    busy.sort(reverse=True)
    return [f"{name}[{pid}] {cpu * 100:.0f}%" for cpu, pid, name in busy[:limit]]


def machine_info() -> dict[str, Any]:
    import importlib.util

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "uvloop": importlib.util.find_spec("uvloop") is not None,
        "httptools": importlib.util.find_spec("httptools") is not None,
        "loadavg": os.getloadavg(),
        "kernel": platform.release(),
    }


# -- a fixed-rate client with ids (outage, kill9) ----------------------------------------------


@dataclass
class LoadStats:
    sent: int = 0
    answered: dict[str, int] = field(default_factory=dict)  # id -> status, for every HTTP answer
    failures: dict[str, int] = field(default_factory=dict)  # exception name -> count
    late: int = 0  # requests not sent on schedule because max_inflight were already in flight
    latencies: list[float] = field(default_factory=list)

    @property
    def ok_ids(self) -> list[str]:
        return [i for i, s in self.answered.items() if s == 200]


class RateLoad:
    """POSTs a one-row V1 body at a fixed rate, each with its own x-request-id (= the event id)."""

    def __init__(self, url: str, rate: float, prefix: str, *, max_inflight: int = 256,
                 timeout: float = 10.0) -> None:
        self.url = url
        self.rate = rate
        self.prefix = prefix
        self.max_inflight = max_inflight
        self.timeout = timeout
        self.stats = LoadStats()
        self.stop = asyncio.Event()
        self._inflight = 0

    async def run(self, max_seconds: float) -> LoadStats:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.timeout)
        connector = aiohttp.TCPConnector(limit=self.max_inflight)
        tasks: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            n = 0
            limit = int(max_seconds * self.rate) + 1
            while not self.stop.is_set() and n < limit:
                due = t0 + n / self.rate
                delay = due - loop.time()
                if delay > 0:
                    try:
                        await asyncio.wait_for(self.stop.wait(), delay)
                        break
                    except TimeoutError:
                        pass
                n += 1
                if self._inflight >= self.max_inflight:
                    self.stats.late += 1
                    continue
                task = loop.create_task(self._one(session, f"{self.prefix}-{n:08d}"))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(list(tasks), timeout=self.timeout + 5)
        return self.stats

    async def _one(self, session: Any, rid: str) -> None:
        self._inflight += 1
        self.stats.sent += 1
        started = time.perf_counter()
        try:
            async with session.post(self.url, data=BODY, headers={
                "content-type": "application/json", "x-request-id": rid}) as resp:
                await resp.read()
                self.stats.answered[rid] = resp.status
                if resp.status == 200:
                    self.stats.latencies.append(time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001 - refused/reset while the sidecar is down: counted
            name = type(exc).__name__
            self.stats.failures[name] = self.stats.failures.get(name, 0) + 1
        finally:
            self._inflight -= 1


class IdsFile:
    """Follows the receiver's ids file (`<id> <request|response|...>` per line) incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.counts: dict[tuple[str, str], int] = {}
        self._partial = b""

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return 0
        self.offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if not line:
                continue
            rid, _, kind = line.decode().partition(" ")
            key = (rid, kind)
            self.counts[key] = self.counts.get(key, 0) + 1
        return len(lines)

    def has_both(self, rid: str) -> bool:
        return (rid, "request") in self.counts and (rid, "response") in self.counts

    def missing(self, ids: Sequence[str]) -> list[str]:
        return [i for i in ids if not self.has_both(i)]

    @property
    def received(self) -> int:
        return sum(self.counts.values())

    @property
    def unique(self) -> int:
        return len(self.counts)

    @property
    def duplicates(self) -> int:
        return sum(c - 1 for c in self.counts.values() if c > 1)


def mib(n: float | None) -> str:
    return "?" if n is None else f"{n / (1 << 20):.1f} MiB"


def save_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")
        log(f"results saved to {path}")


class CpuMeter:
    """Splits the machine's CPU use over a window into ours (named servers and their children,
    wrk, this process) and others' (noise: tests someone else runs, ...). Fractions are of the
    whole machine (1.0 = every core busy); `seconds` is CPU time per named server."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        self.hz = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _machine() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), sum(fields) - idle

    def _tree_ticks(self) -> dict[int, tuple[str, bool, int]]:
        """pid -> (named server, whether it is that server's child, ticks)."""
        owner = {pid: name for name, pid in self.pids.items()}
        out: dict[int, tuple[str, bool, int]] = {}
        for pid, _, ppid, cpu in proc_stats():
            if pid in owner:
                out[pid] = (owner[pid], False, cpu)
            elif ppid in owner:
                out[pid] = (owner[ppid], True, cpu)
        return out

    def start(self) -> None:
        self._m0 = self._machine()
        self._p0 = self._tree_ticks()
        t = os.times()
        self._own0 = t.user + t.system + t.children_user + t.children_system

    def stop(self) -> dict[str, Any]:
        m1 = self._machine()
        p1 = self._tree_ticks()
        t = os.times()
        own = (t.user + t.system + t.children_user + t.children_system - self._own0) * self.hz
        total = m1[0] - self._m0[0]
        busy = m1[1] - self._m0[1]
        per: dict[str, float] = {name: 0.0 for name in self.pids}
        children: dict[str, float] = {}
        for pid, (server, child, ticks) in p1.items():
            used = ticks - self._p0.get(pid, (server, child, 0))[2]
            per[server] += used
            if child:
                children[server] = children.get(server, 0.0) + used
        ours = sum(per.values()) + own
        return {
            "machine_busy": round(busy / max(1, total), 3),
            "ours": round(min(busy, ours) / max(1, total), 3),
            "others": round(max(0.0, busy - ours) / max(1, total), 3),
            # Per server with its children (e.g. the sidecar's delivery process), and those apart.
            "seconds": {name: round(ticks / self.hz, 2) for name, ticks in per.items()},
            "children_seconds": {name: round(ticks / self.hz, 2) for name, ticks in children.items()},
            "wrk_and_bench_seconds": round(own / self.hz, 2),
        }
