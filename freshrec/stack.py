"""The embedded stack: broker, Redis, the Flink jobs, the trainer and the API as child processes.

``up`` writes ``<state_dir>/stack.json`` (ports, pids) so that ``replay``, ``status`` and
``down`` in another terminal find the running stack. Children run in their own process
groups and are stopped group-wide, so no JVM, broker or Redis outlives the stack.

``up`` also supervises: a part that dies is started again (the broker and Redis on their
ports; the Flink jobs from their last checkpoints), at most ``RESTARTS`` times in
``RESTART_WINDOW_S``, and each restart is written to ``<state_dir>/events.jsonl``, which
``freshrec status`` shows.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from connectors.embedded import Service, ServiceError, alive, free_port, start_broker, start_redis, wait_for_port
from freshrec.config import Settings
from jobs.topics import JOB_IDS, jobs_to_run, prepare_log
from serving.status import events_file, stack_doc, stack_file

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESTARTS, RESTART_WINDOW_S = 5, 600
STATE = ("redis", "checkpoints")  # what a stack keeps for the next one in its state dir
# The stack's processes, in start order, and their modules (the API runs under uvicorn).
PROCESSES = {"feature_job": "jobs.feature_job", "catalogue_job": "jobs.catalogue_job",
             "offline_store": "connectors.offline_store", "trainer": "online_learning.trainer", "api": "serving.app"}


def record(state_dir: Path, component: str, what: str) -> dict[str, Any]:
    """Append one line to the stack's event log (what happened to which part, and when)."""
    event = {"ts": time.time(), "component": component, "what": what}
    with events_file(state_dir).open("a") as f:
        f.write(json.dumps(event) + "\n")
    return event


def forget(state_dir: Path) -> list[Path]:
    """Remove what a stack keeps for the next one (``up --fresh``); returns what was there."""
    kept = [state_dir / d for d in STATE if (state_dir / d).exists()]
    for path in kept:
        shutil.rmtree(path)
    return kept


def spawn(name: str, args: list[str], settings: Settings, log_dir: Path) -> subprocess.Popen[bytes]:
    log_dir.mkdir(parents=True, exist_ok=True)
    # FLINK_LOG_DIR: Flink's own log beside ours, not inside the installed pyflink package;
    # FLINK_IDENT_STRING names it after the part (two JVMs wrote over one file).
    env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1", "FLINK_LOG_DIR": str(log_dir.resolve()),
           "FLINK_IDENT_STRING": name}
    with (log_dir / f"{name}.log").open("ab") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=PROJECT_ROOT, start_new_session=True)


def stop_groups(pids: list[int], timeout: float = 10.0) -> None:
    """SIGTERM the process groups all at once (so their shutdowns overlap), then SIGKILL
    whatever is left after ``timeout``: a JVM can take that long to run its shutdown hooks."""
    left = []
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
            left.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [pid for pid in left if alive(pid, group=True)]
    for pid in left:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_group(pid: int, timeout: float = 10.0) -> None:
    stop_groups([pid], timeout)


def start_job(name: str, settings: Settings, log_dir: Path) -> subprocess.Popen[bytes]:
    """A process of :data:`PROCESSES` other than the API (``feature_job``, ``catalogue_job``, ...)."""
    return spawn(name, [sys.executable, "-m", PROCESSES[name]], settings, log_dir)


def start_api(settings: Settings, log_dir: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "uvicorn", "serving.app:app", "--host", settings.api_host,
            "--port", str(settings.api_port), "--no-access-log", "--workers", str(settings.api_workers)]
    return spawn("api", args, settings, log_dir)


def start_standby(settings: Settings, log_dir: Path) -> subprocess.Popen[bytes]:
    """A warm spare of the API (serving/standby.py), logging to the API's log."""
    return spawn("api", [sys.executable, "-m", "serving.standby"], settings, log_dir)


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"the API exited with code {proc.returncode}; see its log")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise ServiceError(f"the API did not answer at {url}/healthz within {timeout:.0f}s")


@dataclass
class Stack:
    """The running embedded stack; stop() ends every part, newest first."""

    settings: Settings
    services: list[Service] = field(default_factory=list)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    restarts: dict[str, list[float]] = field(default_factory=dict)  # part -> when it was restarted
    flink_ui: dict[str, str] = field(default_factory=dict)  # Flink job -> its mini-cluster's web UI
    standby: subprocess.Popen[bytes] | None = None  # the API's warm spare

    @property
    def log_dir(self) -> Path:
        return self.settings.state_dir / "logs"

    @property
    def api_url(self) -> str:
        return f"http://{self.settings.api_host}:{self.settings.api_port}"

    @classmethod
    def start(cls, settings: Settings, log: Any = print, fresh: bool = False) -> Stack:
        """Resumes what an earlier stack in ``settings.state_dir`` kept (Redis: features and
        model versions; the jobs' checkpoints), unless ``fresh``. The broker keeps its log in
        memory, so the log itself always starts empty (a new log epoch)."""
        from features.store import apply

        stack = cls(settings)
        try:
            if fresh:
                gone = forget(settings.state_dir)
                log(f"--fresh: removed {', '.join(map(str, gone))}" if gone else "--fresh: nothing kept to remove")
            elif any((settings.state_dir / d).exists() for d in STATE):
                log(f"resuming the features, models and checkpoints kept in {settings.state_dir} "
                    "(`freshrec up --fresh` starts empty)")
            events_file(settings.state_dir).unlink(missing_ok=True)  # what happened to *this* stack
            log("starting broker and Redis ...")
            broker = start_broker(stack.log_dir)
            stack.services.append(broker)
            redis = start_redis(settings.state_dir / "redis", persistent=True)
            stack.services.append(redis)
            stack.settings = settings = settings.replace(kafka_bootstrap=f"127.0.0.1:{broker.port}",
                                                         redis_url=f"redis://127.0.0.1:{redis.port}/0")
            epoch = prepare_log(settings)
            record(settings.state_dir, "broker", f"started on port {broker.port}, log epoch {epoch}")
            log("registering feature views with Feast ...")
            apply(settings)
            flink_jobs = jobs_to_run(settings)
            log(f"starting the PyFlink feature job{', the catalogue job' if 'catalogue_job' in flink_jobs else ''}, "
                "the offline-store writer, the trainer and the API ...")
            for name in PROCESSES:
                if name not in JOB_IDS or name in flink_jobs:
                    stack.procs[name] = stack.start_process(name)
            wait_healthy(stack.api_url, stack.procs["api"])
            stack.standby = start_standby(stack.settings, stack.log_dir)
            stack.save()
        except BaseException:
            stack.stop()
            raise
        return stack

    def save(self) -> None:
        doc = {"settings": self.settings.to_env(), "api": self.api_url, "flink_ui": self.flink_ui,
               "pids": {name: p.pid for name, p in self.procs.items()}
               | ({"api_standby": self.standby.pid} if self.standby else {})
               | {s.name: s.proc.pid for s in self.services},
               "services": [s.name for s in self.services], "owner": os.getpid(), "started": time.time()}
        stack_file(self.settings.state_dir).write_text(json.dumps(doc, indent=2))

    def start_process(self, name: str) -> subprocess.Popen[bytes]:
        if name == "api":
            return start_api(self.settings, self.log_dir)
        settings = self.settings
        if name in JOB_IDS:  # each job's web UI on a port of its own, kept across restarts
            url = self.flink_ui.setdefault(name, f"http://127.0.0.1:{free_port()}")
            settings = settings.replace(flink_rest_port=int(url.rsplit(":", 1)[1]))
        return start_job(name, settings, self.log_dir)

    def supervise(self, log: Any = print) -> list[dict[str, Any]]:
        """Start again what died; returns the events recorded. Raises :class:`ServiceError` for
        a part that keeps dying (more than RESTARTS times in RESTART_WINDOW_S)."""
        events = []
        for i, service in enumerate(self.services):
            if service.alive():
                continue
            code = self._allow_restart(service.name, service.proc.returncode)
            if service.name == "broker":
                self.services[i] = start_broker(self.log_dir, service.port)
                epoch = prepare_log(self.settings)
                what = (f"exited ({code}); restarted on port {service.port}. It keeps its log in memory, so the log "
                        f"is gone: topics created again, new log epoch {epoch}; the job, the trainer and the "
                        "offline-store writer read the new log from its start")
            else:
                self.services[i] = start_redis(self.settings.state_dir / "redis", service.port, persistent=True)
                what = f"exited ({code}); restarted on port {service.port} from its append-only file"
            events.append(record(self.settings.state_dir, service.name, what))
        for name, proc in list(self.procs.items()):
            if proc.poll() is None:
                continue
            code = self._allow_restart(name, proc.returncode)
            if name == "api" and self.standby is not None and self.standby.poll() is None:
                self.procs[name], self.standby = self.standby, None  # it listens once the port is free
                what = f"exited ({code}); its warm spare took over port {self.settings.api_port}"
            else:
                self.procs[name] = self.start_process(name)
                what = f"exited ({code}); restarted" + (" from its last checkpoint" if name in JOB_IDS else "")
            events.append(record(self.settings.state_dir, name, what))
        if "api" in self.procs and (self.standby is None or self.standby.poll() is not None):
            # Quietly (it serves nobody yet), and not forever: an API that cannot start shows itself.
            recent = [t for t in self.restarts.get("api_standby", []) if time.monotonic() - t < RESTART_WINDOW_S]
            if len(recent) < RESTARTS:
                self.restarts["api_standby"] = [*recent, time.monotonic()]
                self.standby = start_standby(self.settings, self.log_dir)
                self.save()
        for event in events:
            log(f"{event['component']}: {event['what']}")
        if events:
            self.save()
        return events

    def _allow_restart(self, name: str, code: int | None) -> int | None:
        now = time.monotonic()
        recent = [t for t in self.restarts.get(name, []) if now - t < RESTART_WINDOW_S] + [now]
        if len(recent) > RESTARTS:
            raise ServiceError(f"{name} exited ({code}) for the {len(recent)}th time in {RESTART_WINDOW_S // 60} "
                               f"minutes; not restarting it again. See {self.log_dir}/{name}.log")
        self.restarts[name] = recent
        return code

    def stop(self) -> None:
        procs = [*self.procs.values(), *([self.standby] if self.standby else [])]
        stop_groups([proc.pid for proc in procs])
        for proc in procs:
            proc.wait()
        for service in reversed(self.services):
            service.stop()
        stack_file(self.settings.state_dir).unlink(missing_ok=True)


def down(state_dir: Path, timeout: float = 60.0) -> list[str]:
    """Stop a stack started by another ``freshrec up`` process; returns what was stopped.

    The ``up`` process is asked first (SIGTERM), so that it stops its children in order and
    reaps them; whatever is still running after ``timeout`` is stopped here.
    """
    doc = stack_doc(state_dir)
    if doc is None:
        return []
    owner = doc.get("owner")
    if owner and alive(owner):
        os.kill(owner, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while alive(owner) and time.monotonic() < deadline:
            time.sleep(0.2)
    pids: dict[str, int] = doc["pids"]
    services = set(doc.get("services", []))
    # The jobs and the API first (together), then the broker and Redis they talk to.
    stop_groups([pid for name, pid in pids.items() if name not in services])
    stop_groups([pid for name, pid in pids.items() if name in services])
    stack_file(state_dir).unlink(missing_ok=True)
    return list(pids)


def wait_port_free(port: int) -> None:
    try:
        wait_for_port(port, 0.1)
    except ServiceError:
        return
    raise ServiceError(f"port {port} is in use; set FRESHREC_API_PORT to a free port or stop what holds it")
