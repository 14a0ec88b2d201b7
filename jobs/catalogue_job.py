"""The catalogue job: the analysts' feature definitions over the behavior log.

    Kafka behavior-events (the watermark holds back the allowed lateness)
      -> parse (the wire form in Java; other forms in Python; too-late events -> DLQ;
         refused events are the feature job's to report)
      -> drop duplicates (Flink SQL: the first row per user and event id)
      -> the feature catalogue (FRESHREC_FEATURES), split by streaming/sql.split:
         counts, sums, means, min, max and their ratios in Flink SQL (attach_compiled:
           a GROUP BY entity -> online rows -> Redis in Feast's layout, from Java
           (streaming/java's FeastRedisSink); the stream plan -> final rows to the feature
           log from Java; records behind the watermark -> DLQ)
         the rest (distinct counts, last-N lists, co-visitation) on Java operators (attach_java:
           per entity kind and co-visitation definition, keyed state over event-time windows,
           streaming/java's Definitions -> online rows and final rows)
      -> their online rows -> Redis in Feast's layout, from Java (streaming/java's FeastJsonSink)

No Python runs for an event in the wire form (as the project's producers write it): only other
forms the schema accepts reach the Python parser (read_events).

A job of its own, apart from jobs/feature_job.py: in one job the two shared an upstream and one
embedded interpreter (its Python sat at ~105% of a core at 300 events/s), so a busy catalogue
held back the training examples. Apart, each has its own consumer group, checkpoints and
restarts, and a catalogue change restarts only this job. On shared cores this one comes last
(FRESHREC_CATALOGUE_NICE, :func:`lower_priority`): the training examples and the features
serving reads are the path from an event to a changed recommendation.

Run: ``python -m jobs.catalogue_job`` with FRESHREC_* variables set (``freshrec up`` does,
when the catalogue has definitions).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from connectors.log_epoch import Epoch
from features.dsl import load
from freshrec.config import Settings
from jobs.feature_job import kafka_sink, log, read_events, run, write_rows
from jobs.topics import CATALOGUE_JOB_NAME, catalogue_job_id, feature_log_topic
from streaming.definitions import EVENT_ROW, attach, attach_compiled, attach_java, deduplicate
from streaming.sql import split


def build(env: Any, s: Settings, epoch: Epoch) -> None:
    """source -> de-duplicate -> the catalogue: compiled definitions in Flink SQL, the rest on
    Java operators -> Redis and the feature log."""
    lateness = s.allowed_lateness_ms
    events = read_events(env, s, epoch, catalogue_job_id(s), source="catalogue_job", report_invalid=False,
                         hold_back_ms=lateness, row_type=EVENT_ROW)
    unique = deduplicate(env, events, lateness + s.out_of_orderness_ms)
    defs = load(s.features)
    if s.catalogue_engine == "sql":
        compiled, rest = split(defs, stream=True)
        rows, finals, late = attach_java(unique, s.features, lateness, {d.name for d in rest}, settle_ms=0)
    else:  # the engine before: every definition on the Python operators
        compiled = []
        rows, finals, late = attach(unique, s.features, lateness, online=True, settle_ms=0)
    for stream in late:
        stream.sink_to(kafka_sink(s, s.dlq_topic)).name("dlq_catalogue")
    sql_rows = attach_compiled(env, unique, s.features, {d.name for d in compiled}, lateness, s.kafka_bootstrap,
                               feature_log_topic(s), s.dlq_topic) if compiled else []
    write_rows(s, rows, tuple(finals), tuple(sql_rows), log_rows=False, job=CATALOGUE_JOB_NAME)

AUTOGROUP = Path("/proc/self/autogroup")


def session_nice(autogroup: Path = AUTOGROUP) -> int | None:
    """The nice of this process's session group, or None where autogroup does not schedule it.

    The file is missing on kernels built without autogroup, and empty for a process still in the
    root group (no session of its own since the machine's or container's first process, as in
    some CI sandboxes): nice ranks such a process directly.
    """
    try:
        fields = autogroup.read_text().split()  # "/autogroup-42 nice 0"
    except OSError:
        return None
    return int(fields[-1]) if len(fields) == 3 and fields[1] == "nice" else None


def lower_priority(nice: int) -> None:
    """Run this process, and the JVM it starts, ``nice`` steps behind the rest of the machine.

    Most kernels share CPU between sessions first (autogroup scheduling) and rank by nice only
    within a session, so the session's group is reniced too: the process's own nice alone left
    this job an equal share beside the feature job (measured, nice 10 and 19). Only a job that
    leads its session renices it (``freshrec up`` starts each part in a session of its own): one
    started from a shell leaves the shell's other processes alone."""
    os.nice(nice)
    if session_nice() is None:  # no autogroup over this process: nice is enough
        return
    if os.getsid(0) != os.getpid():
        log(f"FRESHREC_CATALOGUE_NICE={nice} ranks the job only within its terminal session; start it "
            "with `setsid` to put it behind the other processes", CATALOGUE_JOB_NAME)
        return
    try:
        AUTOGROUP.write_text(str(nice))
    except OSError as exc:
        log(f"could not lower the priority of the job's session ({exc}); it shares the CPU equally",
            CATALOGUE_JOB_NAME)


def main() -> int:
    settings = Settings.from_env()
    if settings.flink_mode == "local" and settings.catalogue_nice:  # on a cluster, TaskManagers isolate
        lower_priority(settings.catalogue_nice)
    return run(CATALOGUE_JOB_NAME, catalogue_job_id, build)


if __name__ == "__main__":
    sys.exit(main())
