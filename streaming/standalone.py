"""A standalone Flink session cluster (one JobManager, one TaskManager) on this machine, from
the Flink distribution inside the PyFlink package: the cluster path of docker-compose
(``flink run`` against a JobManager) without a docker engine. Used by tests.

Set up as Dockerfile.flink sets up the image: the connector jars and ``flink-python`` in
``lib/`` (loaded once per TaskManager JVM), Flink's default configuration (it carries the
JDK 17 ``--add-opens``) with local addresses, this interpreter for Python.
"""

from __future__ import annotations

import os
import shutil
import signal
import site
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from connectors.embedded import ServiceError, free_port, wait_for_port
from streaming.flink import PROJECT_ROOT
from streaming.jars import ensure_jars


def flink_home() -> Path:
    import pyflink

    return Path(pyflink.__file__).parent


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


@dataclass
class StandaloneCluster:
    rest_port: int
    env: dict[str, str]  # for the `flink` CLI: FLINK_CONF_DIR, FLINK_LIB_DIR, PATH
    procs: list[subprocess.Popen[bytes]]
    log_dir: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.rest_port}"

    def raise_if_exited(self) -> None:
        """Fail at once, with the daemon's log, when the JobManager or TaskManager has died:
        waiting for a dead daemon to answer only turns its reason into a timeout."""
        for proc, role in zip(self.procs, ("standalonesession", "taskexecutor"), strict=False):
            if proc.poll() is not None:
                tail = "".join(f.read_text(errors="replace")[-2000:] for f in self.log_dir.glob(f"*{role}*.log"))
                raise ServiceError(f"the Flink {role} exited with code {proc.returncode}; its log ends:\n{tail}")

    def stop(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)


def start_standalone_cluster(work: Path, slots: int = 1) -> StandaloneCluster:
    home = flink_home()
    shutil.rmtree(work, ignore_errors=True)
    lib, conf, logs = work / "lib", work / "conf", work / "log"
    for d in (lib, conf, logs):
        d.mkdir(parents=True)
    for jar in [*(home / "lib").glob("*.jar"), *(home / "opt").glob("flink-python-*.jar"), *ensure_jars()]:
        (lib / jar.name).symlink_to(jar)
    for f in (home / "conf").glob("log4j*.properties"):
        shutil.copy(f, conf / f.name)
    rest, rpc = free_port(), free_port()
    config = _flat(yaml.safe_load((home / "conf" / "config.yaml").read_text())) | {
        "jobmanager.rpc.address": "127.0.0.1", "jobmanager.rpc.port": rpc,
        "jobmanager.bind-host": "127.0.0.1", "rest.address": "127.0.0.1", "rest.bind-address": "127.0.0.1",
        "rest.port": rest, "taskmanager.bind-host": "127.0.0.1", "taskmanager.host": "127.0.0.1",
        "taskmanager.numberOfTaskSlots": slots, "jobmanager.memory.process.size": "768m",
        "taskmanager.memory.process.size": "1280m", "python.executable": sys.executable,
        "python.client.executable": sys.executable}
    (conf / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "FLINK_CONF_DIR": str(conf), "FLINK_LIB_DIR": str(lib), "FLINK_LOG_DIR": str(logs),
           "PATH": f"{home / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           # thread mode runs Python inside the TaskManager JVM: it must see the venv and the project
           "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), *site.getsitepackages()])}
    procs = []
    for role, script in (("jobmanager", "jobmanager.sh"), ("taskmanager", "taskmanager.sh")):
        with (work / f"{role}.out").open("wb") as out:
            procs.append(subprocess.Popen([str(home / "bin" / script), "start-foreground"], env=env,
                                          stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    cluster = StandaloneCluster(rest, env, procs, logs)
    try:
        wait_for_port(rest, 120, procs[0], "the Flink JobManager")
    except BaseException:
        cluster.stop()
        raise
    return cluster
