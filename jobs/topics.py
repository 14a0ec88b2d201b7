"""The Kafka topics the jobs read and write, with their partition counts."""

from __future__ import annotations

from freshrec.config import Settings


def feature_log_topic(settings: Settings) -> str:
    """Every feature row the job wrote to the online store, for the offline store and audits."""
    return f"{settings.events_topic}-features"


def examples_topic(settings: Settings) -> str:
    """Training examples (positives with their features from before the event, sampled negatives)."""
    return f"{settings.events_topic}-examples"


def topic_plan(settings: Settings) -> dict[str, int]:
    # Partitions cannot be added later on the embedded broker: create with the final count.
    return {settings.events_topic: settings.partitions, settings.dlq_topic: 1, feature_log_topic(settings): 1,
            examples_topic(settings): 1}
