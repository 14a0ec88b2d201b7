"""A PyFlink environment configured from :class:`Settings`: jars, thread mode, checkpoints.

Restart semantics: checkpoints are retained under ``<state_dir>/checkpoints/<name>``; a job
started again with the same name resumes from the newest complete one (state and Kafka
offsets), so a killed job picks up where its last checkpoint left it. On a cluster the same
holds when that directory is shared by the JobManager, the TaskManagers and the submitter
(docker-compose mounts one volume at /state on all three).
"""

from __future__ import annotations

import os
import site
import sys
from pathlib import Path

from connectors.embedded import wait_port_bindable
from freshrec.config import Settings
from streaming.jars import functions_jar, pipeline_jars_option

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def checkpoint_root(settings: Settings, name: str) -> Path:
    return (settings.state_dir / "checkpoints" / name).resolve()


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint (one with ``_metadata``) under ``root``, if any."""
    done = [p.parent for p in root.glob("*/chk-*/_metadata")]
    return max(done, key=lambda p: p.stat().st_mtime) if done else None


def _python_path() -> str:
    # Thread mode embeds the base interpreter in the JVM; it must see this venv and the project.
    paths = [str(PROJECT_ROOT), *site.getsitepackages()]
    current = os.environ.get("PYTHONPATH")
    return os.pathsep.join(paths + ([current] if current else []))


def environment(settings: Settings, name: str, restore: bool = True, batch: bool = False):  # noqa: ANN201
    """A StreamExecutionEnvironment ready for the job called ``name``; ``batch``: bounded input
    in Flink's batch runtime mode (no checkpoints: a failed batch job runs again)."""
    os.environ["PYTHONPATH"] = _python_path()  # read by the JVM the gateway starts
    from pyflink.common import Configuration
    from pyflink.datastream import StreamExecutionEnvironment

    root = checkpoint_root(settings, name)
    root.mkdir(parents=True, exist_ok=True)
    conf = Configuration()
    if settings.flink_mode == "local":
        # On a cluster (`flink run`, see `freshrec deploy`) the connector jars are in the
        # image's lib/ and its configuration names the Python; the rest is the same job.
        conf.set_string("pipeline.jars", pipeline_jars_option())
        conf.set_string("python.executable", sys.executable)
        conf.set_string("python.client.executable", sys.executable)
        conf.set_string("rest.bind-address", "127.0.0.1")
        if settings.flink_rest_port:  # the web UI where `freshrec up` said it would be
            # A job started over (new log epoch, restart) waits for its old JVM to let the port go.
            wait_port_bindable(settings.flink_rest_port, 30, "FRESHREC_FLINK_REST_PORT")
            conf.set_string("rest.port", str(settings.flink_rest_port))
    conf.set_string("pipeline.name", name)
    conf.set_string("python.execution-mode", "thread")  # process mode adds seconds of latency
    if batch:
        conf.set_string("execution.runtime-mode", "BATCH")
        env = StreamExecutionEnvironment.get_execution_environment(conf)
        env.set_parallelism(settings.parallelism)
        return env
    conf.set_string("execution.checkpointing.interval", f"{settings.checkpoint_interval_ms} ms")
    conf.set_string("execution.checkpointing.dir", root.as_uri())
    conf.set_string("execution.checkpointing.externalized-checkpoint-retention", "RETAIN_ON_CANCELLATION")
    conf.set_string("execution.checkpointing.num-retained", "2")
    conf.set_string("state.backend.type", settings.state_backend)
    # RocksDB then uploads only new files per checkpoint; the hashmap backend always writes it all.
    conf.set_string("execution.checkpointing.incremental", "true")
    conf.set_string("restart-strategy.type", "exponential-delay")
    # Network buffers ship when full or after this long; Flink's 100 ms default is a latency floor per hop.
    conf.set_string("execution.buffer-timeout.interval", "5 ms")
    # Under backpressure a checkpoint barrier waits behind every buffered record; a Python operator
    # at ~100 records/s took 20+ s to drain full buffers. Debloating sizes them to ~1 s of records.
    conf.set_string("taskmanager.network.memory.buffer-debloat.enabled", "true")
    checkpoint = latest_checkpoint(root) if restore else None
    if checkpoint is not None:
        conf.set_string("execution.state-recovery.path", checkpoint.as_uri())
        # A job whose log was replaced (connectors/log_epoch.py) names its source anew, so the
        # old log's offsets are left behind while every feature's state is restored.
        conf.set_string("execution.state-recovery.ignore-unclaimed-state", "true")
        print(f"[{name}] resuming from checkpoint {checkpoint}", file=sys.stderr, flush=True)
    env = StreamExecutionEnvironment.get_execution_environment(conf)
    env.set_parallelism(settings.parallelism)
    return env


def java_gateway():  # noqa: ANN201
    """PyFlink's gateway JVM as a job's process starts it (it sees this venv), with streaming/java's
    classes loadable: for tests that call them directly."""
    os.environ["PYTHONPATH"] = _python_path()
    from pyflink.java_gateway import get_gateway
    from pyflink.util.java_utils import add_jars_to_context_class_loader

    add_jars_to_context_class_loader([functions_jar(quiet=True).as_uri()])
    return get_gateway()


def table_environment(batch: bool = False, parallelism: int = 1):  # noqa: ANN201
    """A TableEnvironment for compiled definitions over files (tests, benchmarks), in UTC
    (:func:`streaming.sql.use_utc`). Its JVM sees this venv as a job's does: the gateway is one
    per process, so a job started later in the process runs its Python operators in it too."""
    os.environ["PYTHONPATH"] = _python_path()
    from pyflink.table import EnvironmentSettings, TableEnvironment

    from streaming.sql import use_utc

    t_env = TableEnvironment.create(EnvironmentSettings.in_batch_mode() if batch
                                    else EnvironmentSettings.in_streaming_mode())
    t_env.get_config().set("parallelism.default", str(parallelism))
    t_env.get_config().set("pipeline.jars", pipeline_jars_option())  # freshrec's functions (streaming/java)
    use_utc(t_env)
    return t_env
