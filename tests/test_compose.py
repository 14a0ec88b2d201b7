"""docker-compose.yml cannot run here (no docker engine); check what can be checked of it."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import yaml

from freshrec.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_compose_is_consistent_with_the_repo() -> None:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = doc["services"]
    known = {"FRESHREC_" + f.name.upper() for f in fields(Settings)}
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            assert (ROOT / svc["build"] / "Dockerfile").exists(), name
            ours = {k: str(v) for k, v in svc["environment"].items() if k.startswith("FRESHREC_")}
            assert set(ours) <= known, f"{name} sets unknown FRESHREC_* variables"
            Settings.from_env(ours)  # values parse
        command = svc.get("command", [])
        if command[:2] == ["python", "-m"]:
            module = ROOT / command[2].replace(".", "/")
            assert module.with_suffix(".py").exists(), f"{name} runs missing module {command[2]}"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
    for name in ("kafka", "redis", "api"):
        assert "healthcheck" in services[name], name
    host_ports = [p.split(":")[0] for s in services.values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports))
    dockerfile = (ROOT / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
