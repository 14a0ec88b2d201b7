"""docker-compose.yml cannot run here (no docker engine); check what can be checked of it."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from urllib.parse import urlparse

import yaml

from freshrec.cli import parser
from freshrec.config import Settings
from freshrec.deploy import flink_run, job_env

ROOT = Path(__file__).resolve().parent.parent
DOC = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = DOC["services"]


def dockerfile(svc: dict) -> Path | None:
    build = svc.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        return ROOT / build / "Dockerfile"
    return ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")


def runs_freshrec(svc: dict) -> bool:
    return any(k.startswith("FRESHREC_") for k in svc.get("environment", {}))


def test_images_dockerfiles_and_what_they_copy_exist() -> None:
    for name, svc in SERVICES.items():
        assert "image" in svc or "build" in svc, name
        path = dockerfile(svc)
        if path is None:
            continue
        assert path.exists(), f"{name}: {path} missing"
        for line in path.read_text().splitlines():
            if line.startswith("COPY ") and "--from" not in line:
                for src in line.split()[1:-1]:
                    assert (path.parent / src).exists(), f"{path.name} copies missing {src}"


def test_commands_name_things_that_exist() -> None:
    commands = {a.dest: a for a in parser()._subparsers._group_actions}  # type: ignore[union-attr]
    subcommands = set(next(iter(commands.values())).choices)
    for name, svc in SERVICES.items():
        command = svc.get("command", [])
        if command[:2] == ["python", "-m"]:
            assert (ROOT / command[2].replace(".", "/")).with_suffix(".py").exists(), f"{name}: {command[2]}"
        if command[:1] == ["freshrec"]:
            assert command[1] in subcommands, f"{name} runs `freshrec {command[1]}`, which does not exist"
    job = Path(flink_run(Settings(), root=ROOT)[flink_run(Settings()).index("--python") + 1])
    assert job.exists(), "the job file `freshrec deploy` submits"


def test_variables_are_known_parse_and_point_at_services() -> None:
    known = {"FRESHREC_" + f.name.upper() for f in fields(Settings)}
    for name, svc in SERVICES.items():
        ours = {k: str(v) for k, v in svc.get("environment", {}).items() if k.startswith("FRESHREC_")}
        assert set(ours) <= known, f"{name} sets unknown variables {set(ours) - known}"
        if not runs_freshrec(svc):
            continue
        s = Settings.from_env(ours)  # values parse
        # a service's defaults point at localhost: inside compose they must name services
        assert s.kafka_bootstrap.split(":")[0] in SERVICES, f"{name}: FRESHREC_KAFKA_BOOTSTRAP"
        assert urlparse(s.redis_url).hostname in SERVICES, f"{name}: FRESHREC_REDIS_URL"
        if s.flink_mode == "cluster":
            assert s.flink_jobmanager.split(":")[0] in SERVICES, f"{name}: FRESHREC_FLINK_JOBMANAGER"
    assert job_env(Settings(partitions=4))["FRESHREC_PARTITIONS"] == "4"


def test_health_ports_and_dependencies() -> None:
    for name in ("kafka", "redis", "jobmanager", "api"):
        assert "healthcheck" in SERVICES[name], name
    for name, svc in SERVICES.items():
        for dep, how in svc.get("depends_on", {}).items():
            assert dep in SERVICES, f"{name} depends on unknown service {dep}"
            if how.get("condition") == "service_healthy":
                assert "healthcheck" in SERVICES[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"
    host_ports = [p.split(":")[0] for s in SERVICES.values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports)), "two services publish the same host port"
    flink = SERVICES["jobmanager"]["environment"]["FLINK_PROPERTIES"]
    assert "state.backend.type: rocksdb" in flink and "file:///state" in flink
    assert {"jobmanager", "taskmanager", "job-submitter"} <= set(SERVICES)
