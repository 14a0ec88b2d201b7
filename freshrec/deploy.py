"""Deploying the Flink jobs on a cluster: the topic plan and the exact ``flink run`` commands.

``freshrec deploy --print`` shows, for the current FRESHREC_* configuration, the topics to
create (with partitions) and the commands that submit the jobs to the JobManager: the
feature job, and the catalogue job when the catalogue defines something; ``freshrec deploy
--submit`` runs them (docker-compose's job-submitter does). The jobs are the same files the
embedded stack runs (jobs/feature_job.py, jobs/catalogue_job.py); with
FRESHREC_FLINK_MODE=cluster they leave jars, the Python interpreter and the project's code to
the cluster's image and configuration.

The TaskManagers import the project installed in their image (Dockerfile.flink), as they must
its dependencies; nothing is shipped with ``--pyFiles``. In thread mode a TaskManager runs the
Python of all its jobs in one interpreter, which keeps every module it imported: a shipped
package's directory went away with its job, and a later job's first import of another module
of that package failed (``No module named 'streaming.definitions'``, the catalogue job after the
feature job had ended), while modules already imported stayed at the first job's version. New
code, a catalogue included, is a new image and a TaskManager restart.

>>> s = Settings(flink_mode="cluster", flink_jobmanager="jm:8081", parallelism=2, state_dir=Path("/state"))
>>> cmd = flink_run(s, root=Path("/app"))
>>> cmd
['flink', 'run', '--jobmanager', 'jm:8081', '--detached', '--parallelism', '2', '--python', '/app/jobs/feature_job.py']
>>> flink_run(s, root=Path("/app"), job="catalogue_job")[8]
'/app/jobs/catalogue_job.py'
>>> list(chosen(Settings(features="features.none")))
['feature_job']
>>> chosen(Settings(features="features.none"), "catalogue_job")  # doctest: +ELLIPSIS
Traceback (most recent call last):
ValueError: --job catalogue_job: this configuration runs feature_job; the catalogue job runs when ...
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import fields
from pathlib import Path

from freshrec.config import Settings
from jobs.topics import jobs_to_run, topic_plan
from streaming.flink import PROJECT_ROOT, checkpoint_root, latest_checkpoint

SECRET = {"FRESHREC_ADMIN_API_KEY"}


def flink_run(settings: Settings, root: Path = PROJECT_ROOT, flink: str = "flink",
              job: str = "feature_job") -> list[str]:
    """The submit command. The job's Python main runs in the client, which reads FRESHREC_*;
    the operators carry the settings with them, so TaskManagers need no FRESHREC_* of their own."""
    return [flink, "run", "--jobmanager", settings.flink_jobmanager, "--detached",
            "--parallelism", str(settings.parallelism), "--python", str(root / "jobs" / f"{job}.py")]


def job_env(settings: Settings) -> dict[str, str]:
    """The FRESHREC_* values that differ from the defaults (secrets left out), cluster mode on."""
    defaults = Settings()
    env = {"FRESHREC_" + f.name.upper(): str(getattr(settings, f.name)) for f in fields(Settings)
           if getattr(settings, f.name) != getattr(defaults, f.name)}
    env["FRESHREC_FLINK_MODE"] = "cluster"
    return {k: v for k, v in sorted(env.items()) if k not in SECRET}


def chosen(settings: Settings, only: str | None = None) -> dict[str, str]:
    """The jobs to describe or submit, each with its id: all this configuration runs, or ``only``
    that one (a job cancelled alone is submitted again alone)."""
    jobs = jobs_to_run(settings)
    if only is not None and only not in jobs:
        raise ValueError(f"--job {only}: this configuration runs {', '.join(jobs)}"
                         + ("; the catalogue job runs when FRESHREC_FEATURES defines something"
                            if only == "catalogue_job" else ""))
    return {only: jobs[only]} if only else jobs


def describe(settings: Settings, only: str | None = None) -> str:
    lines = ["# topics (create before the jobs; partitions cannot be lowered later)"]
    lines += [f"{topic:40} partitions={n}" for topic, n in topic_plan(settings).items()]
    for job, job_id in chosen(settings, only).items():
        root = checkpoint_root(settings, job_id)
        ckpt = latest_checkpoint(root)
        what = ("the feature job (it also writes the training examples)" if job == "feature_job"
                else f"the catalogue job ({settings.features})")
        lines += ["", f"# submit {what}; the TaskManagers import the project installed in their image",
                  " \\\n  ".join([*(f"{k}={shlex.quote(v)}" for k, v in job_env(settings).items()),
                                 shlex.join(flink_run(settings, job=job))]),
                  f"# state: {settings.state_backend}, checkpoints every {settings.checkpoint_interval_ms} ms under "
                  f"{root}",
                  "# resumes from: " + (str(ckpt) if ckpt else "nothing yet (a fresh start)")
                  + " - the job finds the newest retained checkpoint itself"]
    return "\n".join(lines)


def submit(settings: Settings, only: str | None = None) -> int:
    env = {**os.environ, **settings.replace(flink_mode="cluster").to_env()}
    for job in chosen(settings, only):
        code = subprocess.run(flink_run(settings, job=job), env=env).returncode
        if code:
            return code
    return 0
