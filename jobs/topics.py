"""The Kafka topics the jobs read and write, with their partition counts, and the consumer
groups that read them."""

from __future__ import annotations

from collections.abc import Callable

from connectors.log_epoch import Epoch, ensure_log
from features.dsl import load
from freshrec.config import Settings

JOB_NAME = "freshrec-features"
CATALOGUE_JOB_NAME = "freshrec-catalogue"


def feature_job_id(settings: Settings) -> str:
    """The feature job of a project: its Kafka consumer group and its checkpoint folder."""
    return f"{JOB_NAME}-{settings.feast_project}"


def catalogue_job_id(settings: Settings) -> str:
    """The catalogue job of a project: its Kafka consumer group and its checkpoint folder."""
    return f"{CATALOGUE_JOB_NAME}-{settings.feast_project}"


# The Flink jobs by their process names, each with its id (consumer group, checkpoint folder).
JOB_IDS: dict[str, Callable[[Settings], str]] = {"feature_job": feature_job_id, "catalogue_job": catalogue_job_id}


def jobs_to_run(settings: Settings) -> dict[str, str]:
    """The Flink jobs this configuration runs, each with its id: the catalogue job only when
    the catalogue defines something (``features.none`` does not). Here, not in the jobs'
    modules, so callers (up, deploy) skip importing PyFlink (~4.7 s)."""
    catalogue = bool(load(settings.features))
    return {name: job_id(settings) for name, job_id in JOB_IDS.items() if name != "catalogue_job" or catalogue}


def offline_group(settings: Settings, epoch: str) -> str:
    """The offline-store writer's consumer group in log epoch ``epoch`` (connectors/offline_store.py says why)."""
    return f"freshrec-offline-{settings.feast_project}-{epoch}"


def feature_log_topic(settings: Settings) -> str:
    """Every feature row the job wrote to the online store, for the offline store and audits."""
    return f"{settings.events_topic}-features"


def examples_topic(settings: Settings) -> str:
    """Training examples (positives with their features from before the event, sampled negatives)."""
    return f"{settings.events_topic}-examples"


def epoch_topic(settings: Settings) -> str:
    """One record naming the log's epoch (connectors/log_epoch.py)."""
    return f"{settings.events_topic}-epoch"


def topic_plan(settings: Settings) -> dict[str, int]:
    # Partitions cannot be added later on the embedded broker: create with the final count.
    return {settings.events_topic: settings.partitions, settings.dlq_topic: 1, feature_log_topic(settings): 1,
            examples_topic(settings): 1, epoch_topic(settings): 1}


def prepare_log(settings: Settings) -> Epoch:
    """Create the topics that are missing (and a new log's epoch marker); the log's epoch."""
    return ensure_log(settings.kafka_bootstrap, topic_plan(settings), epoch_topic(settings))
