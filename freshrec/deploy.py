"""Deploying the Flink jobs on a cluster: the topic plan and the exact ``flink run`` commands.

``freshrec deploy --print`` shows, for the current FRESHREC_* configuration, the topics to
create (with partitions) and the commands that submit the jobs to the JobManager: the
feature job, and the catalogue job when the catalogue defines something; ``freshrec deploy
--submit`` runs them (docker-compose's job-submitter does). The jobs are the same files the
embedded stack runs (jobs/feature_job.py, jobs/catalogue_job.py); with
FRESHREC_FLINK_MODE=cluster they leave jars and the Python interpreter to the cluster's image
and configuration.

>>> s = Settings(flink_mode="cluster", flink_jobmanager="jm:8081", parallelism=2, state_dir=Path("/state"))
>>> cmd = flink_run(s, root=Path("/app"))
>>> cmd[:9]
['flink', 'run', '--jobmanager', 'jm:8081', '--detached', '--parallelism', '2', '--python', '/app/jobs/feature_job.py']
>>> cmd[9:]
['--pyFiles', '/state/deploy/freshrec-packages.zip']
>>> flink_run(s, root=Path("/app"), job="catalogue_job")[8]
'/app/jobs/catalogue_job.py'
"""

from __future__ import annotations

import os
import shlex
import subprocess
import zipfile
from dataclasses import fields
from pathlib import Path

from freshrec.config import Settings
from jobs.topics import jobs_to_run, topic_plan
from streaming.flink import PROJECT_ROOT, checkpoint_root, latest_checkpoint

SECRET = {"FRESHREC_ADMIN_API_KEY"}
PACKAGES = ("connectors", "streaming", "jobs", "features", "online_learning", "serving", "freshrec")


def packages_zip(settings: Settings) -> Path:
    return settings.state_dir / "deploy" / "freshrec-packages.zip"


def flink_run(settings: Settings, root: Path = PROJECT_ROOT, flink: str = "flink",
              job: str = "feature_job") -> list[str]:
    """The submit command. The job's Python main runs in the client, which reads FRESHREC_*;
    the operators carry the settings with them, so TaskManagers need no FRESHREC_* of their own.
    ``--pyFiles`` ships the project's packages (see :func:`package`) to the TaskManagers."""
    return [flink, "run", "--jobmanager", settings.flink_jobmanager, "--detached",
            "--parallelism", str(settings.parallelism), "--python", str(root / "jobs" / f"{job}.py"),
            "--pyFiles", str(packages_zip(settings))]


def package(settings: Settings, root: Path = PROJECT_ROOT) -> Path:
    """The project's packages in one zip for ``--pyFiles``. A zip goes on the Python path with
    the packages inside it; a shipped directory goes on the path itself, so its modules shadow
    libraries (connectors/kafka.py hid kafka-python). Not the whole checkout: its .venv would go too."""
    path = packages_zip(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for name in PACKAGES:
            for file in sorted((root / name).rglob("*")):
                if file.is_file() and "__pycache__" not in file.parts:
                    z.write(file, file.relative_to(root).as_posix())
    tmp.replace(path)
    return path


def job_env(settings: Settings) -> dict[str, str]:
    """The FRESHREC_* values that differ from the defaults (secrets left out), cluster mode on."""
    defaults = Settings()
    env = {"FRESHREC_" + f.name.upper(): str(getattr(settings, f.name)) for f in fields(Settings)
           if getattr(settings, f.name) != getattr(defaults, f.name)}
    env["FRESHREC_FLINK_MODE"] = "cluster"
    return {k: v for k, v in sorted(env.items()) if k not in SECRET}


def describe(settings: Settings) -> str:
    lines = ["# topics (create before the jobs; partitions cannot be lowered later)"]
    lines += [f"{topic:40} partitions={n}" for topic, n in topic_plan(settings).items()]
    for job, job_id in jobs_to_run(settings).items():
        root = checkpoint_root(settings, job_id)
        ckpt = latest_checkpoint(root)
        what = ("the feature job (it also writes the training examples)" if job == "feature_job"
                else f"the catalogue job ({settings.features})")
        lines += ["", f"# submit {what}; --submit first zips the project's packages into {packages_zip(settings)}",
                  " \\\n  ".join([*(f"{k}={shlex.quote(v)}" for k, v in job_env(settings).items()),
                                 shlex.join(flink_run(settings, job=job))]),
                  f"# state: {settings.state_backend}, checkpoints every {settings.checkpoint_interval_ms} ms under "
                  f"{root}",
                  "# resumes from: " + (str(ckpt) if ckpt else "nothing yet (a fresh start)")
                  + " - the job finds the newest retained checkpoint itself"]
    return "\n".join(lines)


def submit(settings: Settings) -> int:
    package(settings)
    env = {**os.environ, **settings.replace(flink_mode="cluster").to_env()}
    for job in jobs_to_run(settings):
        code = subprocess.run(flink_run(settings, job=job), env=env).returncode
        if code:
            return code
    return 0
