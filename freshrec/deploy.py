"""Deploying the feature job on a Flink cluster: the topic plan and the exact ``flink run``.

``freshrec deploy --print`` shows, for the current FRESHREC_* configuration, the topics to
create (with partitions) and the command that submits the job to the JobManager;
``freshrec deploy --submit`` runs it (docker-compose's job-submitter does). The job is the
same file the embedded stack runs (jobs/feature_job.py); with FRESHREC_FLINK_MODE=cluster it
leaves jars and the Python interpreter to the cluster's image and configuration.

>>> s = Settings(flink_mode="cluster", flink_jobmanager="jm:8081", parallelism=2)
>>> cmd = flink_run(s, root=Path("/app"))
>>> cmd[:9]
['flink', 'run', '--jobmanager', 'jm:8081', '--detached', '--parallelism', '2', '--python', '/app/jobs/feature_job.py']
>>> cmd[9], cmd[10].split(",")[:2]
('--pyFiles', ['/app/connectors', '/app/streaming'])
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import fields
from pathlib import Path

from freshrec.config import Settings
from jobs.topics import topic_plan
from streaming.flink import PROJECT_ROOT, checkpoint_root, latest_checkpoint

SECRET = {"FRESHREC_ADMIN_API_KEY"}
PACKAGES = ("connectors", "streaming", "jobs", "features", "online_learning", "serving", "freshrec")


def flink_run(settings: Settings, root: Path = PROJECT_ROOT, flink: str = "flink") -> list[str]:
    """The submit command. The job's Python main runs in the client, which reads FRESHREC_*;
    the operators carry the settings with them, so TaskManagers need no FRESHREC_* of their own.
    ``--pyFiles`` ships the project's packages to the TaskManagers (not the directory: a
    checkout's .venv would go too)."""
    return [flink, "run", "--jobmanager", settings.flink_jobmanager, "--detached",
            "--parallelism", str(settings.parallelism), "--python", str(root / "jobs" / "feature_job.py"),
            "--pyFiles", ",".join(str(root / p) for p in PACKAGES)]


def job_env(settings: Settings) -> dict[str, str]:
    """The FRESHREC_* values that differ from the defaults (secrets left out), cluster mode on."""
    defaults = Settings()
    env = {"FRESHREC_" + f.name.upper(): str(getattr(settings, f.name)) for f in fields(Settings)
           if getattr(settings, f.name) != getattr(defaults, f.name)}
    env["FRESHREC_FLINK_MODE"] = "cluster"
    return {k: v for k, v in sorted(env.items()) if k not in SECRET}


def describe(settings: Settings, job_name: str) -> str:
    lines = ["# topics (create before the job; partitions cannot be lowered later)"]
    lines += [f"{topic:40} partitions={n}" for topic, n in topic_plan(settings).items()]
    root = checkpoint_root(settings, f"{job_name}-{settings.feast_project}")
    ckpt = latest_checkpoint(root)
    lines += ["", "# submit the feature job (it also writes the training examples)",
              " \\\n  ".join([*(f"{k}={shlex.quote(v)}" for k, v in job_env(settings).items()),
                             shlex.join(flink_run(settings))]),
              "",
              f"# state: {settings.state_backend}, checkpoints every {settings.checkpoint_interval_ms} ms under "
              f"{root}",
              "# resumes from: " + (str(ckpt) if ckpt else "nothing yet (a fresh start)")
              + " - the job finds the newest retained checkpoint itself"]
    return "\n".join(lines)


def submit(settings: Settings) -> int:
    env = {**os.environ, **settings.replace(flink_mode="cluster").to_env()}
    return subprocess.run(flink_run(settings), env=env).returncode
