"""All configuration, in one place, read from ``FRESHREC_*`` environment variables.

The embedded stack (``freshrec up``) and docker-compose read the same variables, so a job
behaves the same on a laptop and on a cluster.

>>> s = Settings.from_env({"FRESHREC_WINDOW_SECONDS": "600"})
>>> s.window_seconds, s.events_topic
(600, 'behavior-events')
>>> Settings.from_env({"FRESHREC_WINDOW_SECONDS": "ten"})
Traceback (most recent call last):
...
freshrec.config.ConfigError: FRESHREC_WINDOW_SECONDS='ten' is not an integer; set it to a whole number
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the variable and the fix."""


# Variables that no longer mean anything, and what replaced them: a deployment that still sets
# one is told, rather than silently running with a default.
_FADING = "co-visitation counts fade instead of leaving a window: set FRESHREC_COVISIT_HALF_LIFE_SECONDS"
RETIRED = {"FRESHREC_COVISIT_WINDOW_SECONDS": _FADING, "FRESHREC_COVISIT_PANE_SECONDS": _FADING}


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True)
class Settings:
    kafka_bootstrap: str = field(default="127.0.0.1:9092", metadata=_doc("Kafka bootstrap servers"))
    redis_url: str = field(default="redis://127.0.0.1:6379/0", metadata=_doc("Redis for the online store"))
    events_topic: str = field(default="behavior-events", metadata=_doc("validated behavior events"))
    dlq_topic: str = field(default="behavior-events-dlq", metadata=_doc("refused events with reasons"))
    partitions: int = field(default=2, metadata=_doc("partitions of the events topic (fixed at creation)"))
    feast_project: str = field(default="freshrec", metadata=_doc("Feast project; namespaces Redis keys"))
    state_dir: Path = field(default=Path(".freshrec"), metadata=_doc("runtime files, checkpoints, logs"))
    features: str = field(default="features.catalog", metadata=_doc("the feature catalogue: a module or a .py "
                                                                    "file of definitions (features/dsl.py)"))
    catalogue_nice: int = field(default=10, metadata=_doc(
        "CPU niceness (0-19) of the local catalogue job: on shared cores the feature job and the trainer "
        "come first, and the catalogue falls behind while the cores are full; 0 shares them equally"))
    catalogue_engine: str = field(default="sql", metadata=_doc(
        "how the catalogue job runs: sql (counts, sums, means, min and max in Flink's SQL operators, the rest "
        "on freshrec's Java operators) or python (every definition on the Python operators, the engine before: "
        "a baseline)"))
    window_seconds: int = field(default=3600, metadata=_doc("window of the recent counts"))
    window_pane_seconds: int = field(default=60, metadata=_doc("the recent-counts window slides in these steps"))
    last_n: int = field(default=20, metadata=_doc("length of the last-viewed-items sequence"))
    top_categories: int = field(default=3, metadata=_doc("categories kept in a user's top list"))
    covisit_gap_seconds: int = field(default=1800, metadata=_doc("views closer than this co-visit"))
    covisit_proximity_seconds: int = field(default=60, metadata=_doc(
        "a co-visit of views this far apart counts half of one of views at the same time (0: all count 1)"))
    covisit_half_life_seconds: int = field(default=3650 * 86400, metadata=_doc(
        "a co-visit counts half as much after this much event time (0: never fades)"))
    covisit_kept: int = field(default=100, metadata=_doc("co-visit partners an item keeps counting (the "
                                                         "weakest go beyond twice this)"))
    covisit_max_views: int = field(default=50, metadata=_doc("recent views per user kept for pairing"))
    covisit_top_k: int = field(default=20, metadata=_doc("neighbours kept per item"))
    trending_size: int = field(default=100, metadata=_doc("items kept in the trending list"))
    category_trending_size: int = field(default=20, metadata=_doc(
        "items kept in each category's trending list (0: no lists per category)"))
    out_of_orderness_ms: int = field(default=2000, metadata=_doc("watermark lag behind the newest event"))
    allowed_lateness_ms: int = field(default=600_000, metadata=_doc("events later than this go to the DLQ"))
    idle_timeout_ms: int = field(default=30_000, metadata=_doc("a silent partition stops holding watermarks"))
    checkpoint_interval_ms: int = field(default=5000, metadata=_doc("Flink checkpoint interval"))
    broker_check_ms: int = field(default=2000, metadata=_doc("components check this often whether the broker "
                                                             "lost its log (embedded broker restarts)"))
    fetch_wait_ms: int = field(default=50, metadata=_doc("longest a fetch of the job's and the trainer's Kafka "
                                                         "consumers waits at the broker for new records"))
    state_backend: str = field(default="hashmap", metadata=_doc("Flink state backend: hashmap or rocksdb"))
    parallelism: int = field(default=1, metadata=_doc("Flink parallelism (2 never helped on 2 cores)"))
    flink_mode: str = field(default="local", metadata=_doc("local: a PyFlink mini-cluster in the job's process; "
                                                           "cluster: submitted with `flink run` (freshrec deploy)"))
    flink_rest_port: int = field(default=0, metadata=_doc(
        "REST and web UI port of a local job's Flink mini-cluster (0: any free port; `freshrec up` picks one per "
        "job and prints it)"))
    flink_jobmanager: str = field(default="jobmanager:8081", metadata=_doc("JobManager REST address (cluster mode)"))
    sink_flush_ms: int = field(default=50, metadata=_doc("longest a feature row waits before Redis"))
    sink_batch_rows: int = field(default=500, metadata=_doc("feature rows per Redis pipeline"))
    positives: str = field(default="view,click,cart,fav,buy", metadata=_doc("behaviors that make positive examples"))
    negatives: int = field(default=2, metadata=_doc("sampled negative examples per positive"))
    attribution_seconds: int = field(default=1800, metadata=_doc("a conversion credits a view this recent"))
    min_count: int = field(default=2, metadata=_doc("sightings before an id gets model parameters"))
    param_ttl_seconds: int = field(default=21600, metadata=_doc("ids unseen this long (event time) lose them"))
    embedding_rows: int = field(default=200_000, metadata=_doc("cap on rows per embedding table (LRU beyond)"))
    publish_interval_ms: int = field(default=200, metadata=_doc("the trainer publishes deltas this often"))
    # Each snapshot stalls the trainer (0.28 s alone, 2.2 s measured under load); readers need one
    # only to start or after a gap, and catch up on 1,500 deltas (5 min) in ~5 s.
    snapshot_interval_seconds: int = field(default=300, metadata=_doc("and a full snapshot this often"))
    gate_margin: float = field(default=0.05, metadata=_doc("refuse parameters whose AUC drops this much"))
    gate_max_abs: float = field(default=100.0, metadata=_doc("refuse parameters with a weight beyond this"))
    model_poll_ms: int = field(default=250, metadata=_doc(
        "the API applies new parameters when the trainer announces them, and checks this often besides"))
    api_host: str = field(default="127.0.0.1", metadata=_doc("recommendation API bind address"))
    api_port: int = field(default=8000, metadata=_doc("recommendation API port"))
    max_body_bytes: int = field(default=4 * 1024 * 1024, metadata=_doc(
        "largest request body the API reads (413 above it); one event may be at most 16 KiB (422 above it)"))
    api_workers: int = field(default=1, metadata=_doc("uvicorn worker processes of the API"))
    redis_timeout_ms: int = field(default=50, metadata=_doc("the API answers degraded when Redis is slower"))
    item_cache_ms: int = field(default=250, metadata=_doc("the API reuses an item's feature row this long "
                                                          "(0: read every time); user rows are always read"))
    admin_api_key: str = field(default="", repr=False,
                               metadata=_doc("X-API-Key for the API's /admin endpoints (unset: admin disabled)"))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if env is None else env
        for name, instead in RETIRED.items():
            if name in env:
                raise ConfigError(f"{name} is no longer used ({instead}); unset it")
        values: dict[str, object] = {}
        for f in fields(cls):
            name = "FRESHREC_" + f.name.upper()
            if name not in env:
                continue
            raw = env[name]
            if f.type in ("int", int):
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise ConfigError(f"{name}={raw!r} is not an integer; set it to a whole number") from None
            elif f.type in ("float", float):
                try:
                    values[f.name] = float(raw)
                except ValueError:
                    raise ConfigError(f"{name}={raw!r} is not a number; set it to e.g. 0.05") from None
            elif f.type in ("Path", Path):
                values[f.name] = Path(raw)
            else:
                values[f.name] = raw
        values.update(overrides)
        settings = cls(**values)  # type: ignore[arg-type]
        settings.check()
        return settings

    def check(self) -> None:
        positive = ("partitions", "window_seconds", "window_pane_seconds", "covisit_kept", "covisit_max_views",
                    "last_n", "covisit_gap_seconds", "covisit_top_k", "trending_size", "checkpoint_interval_ms",
                    "broker_check_ms", "parallelism", "fetch_wait_ms", "sink_flush_ms", "sink_batch_rows",
                    "attribution_seconds", "min_count", "param_ttl_seconds", "embedding_rows", "publish_interval_ms",
                    "snapshot_interval_seconds", "model_poll_ms", "api_workers", "redis_timeout_ms")
        if self.catalogue_engine not in ("sql", "python"):
            raise ConfigError(f"FRESHREC_CATALOGUE_ENGINE={self.catalogue_engine!r} is not an engine; set it to "
                              "sql or python")
        if not 0 <= self.catalogue_nice <= 19:
            raise ConfigError(f"FRESHREC_CATALOGUE_NICE={self.catalogue_nice} must be between 0 and 19")
        for name in ("item_cache_ms", "category_trending_size", "flink_rest_port", "covisit_half_life_seconds",
                     "covisit_proximity_seconds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"FRESHREC_{name.upper()}={getattr(self, name)} must be 0 or more")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"FRESHREC_{name.upper()}={getattr(self, name)} must be greater than 0")
        if self.window_seconds % self.window_pane_seconds:
            raise ConfigError(f"FRESHREC_WINDOW_SECONDS={self.window_seconds} is not a multiple of "
                              f"FRESHREC_WINDOW_PANE_SECONDS={self.window_pane_seconds}; make the window a whole "
                              "number of panes")
        from connectors.schema import BEHAVIORS

        unknown = [b for b in self.positive_behaviors if b not in BEHAVIORS]
        if unknown or not self.positive_behaviors:
            raise ConfigError(f"FRESHREC_POSITIVES={self.positives!r}: use a comma list of " + ", ".join(BEHAVIORS))
        if self.negatives < 0:
            raise ConfigError(f"FRESHREC_NEGATIVES={self.negatives} must be 0 or more")
        if self.flink_mode not in ("local", "cluster"):
            raise ConfigError(f"FRESHREC_FLINK_MODE={self.flink_mode!r}; use local or cluster")
        if self.state_backend not in ("hashmap", "rocksdb"):
            raise ConfigError(f"FRESHREC_STATE_BACKEND={self.state_backend!r}; use hashmap or rocksdb")
        if not self.feast_project.replace("_", "").isalnum():
            raise ConfigError(f"FRESHREC_FEAST_PROJECT={self.feast_project!r}; use letters, digits and _")

    @property
    def positive_behaviors(self) -> tuple[str, ...]:
        return tuple(b.strip() for b in self.positives.split(",") if b.strip())

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def to_env(self) -> dict[str, str]:
        """The variables that reproduce these settings in a child process."""
        return {"FRESHREC_" + f.name.upper(): str(getattr(self, f.name)) for f in fields(self)}

    @staticmethod
    def describe() -> list[tuple[str, str, str]]:
        return [("FRESHREC_" + f.name.upper(), str(f.default), f.metadata.get("doc", "")) for f in fields(Settings)]
