"""The trainer: training examples in, versioned parameters out.

    Kafka <events>-examples -> OnlineRecommender.learn_many (test-then-train)
      -> every FRESHREC_PUBLISH_INTERVAL_MS: quality gate -> delta to Redis (ParameterStore)
      -> every FRESHREC_SNAPSHOT_INTERVAL_SECONDS: a full snapshot

Every published version records the Kafka offsets its parameters include. A restarted
trainer rebuilds the newest published state (snapshot + deltas) and reads on from exactly
those offsets: nothing in the published model is learned twice, nothing is skipped.
Examples learned but not yet published when it died are simply learned again. (Two small
exceptions, both documented in the README: admission counts restart from the snapshot's, and
a positive whose negatives straddle a publish loses that one pair.)

A version someone else published (``freshrec model rollback``) is followed: the trainer
loads it and keeps learning from there, so the next delta builds on the rolled-back state.

Run: ``python -m online_learning.trainer`` with FRESHREC_* variables set (``freshrec up`` does).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from typing import Any

import redis
from kafka import TopicPartition

from connectors.kafka import consumer
from connectors.log_epoch import EpochWatch
from features.dsl import load_ranking
from freshrec.config import Settings
from jobs.topics import epoch_topic, examples_topic, topic_plan
from online_learning.examples import BatchExamples, Example, ExampleBuilder
from online_learning.gate import QualityGate
from online_learning.params import decode
from online_learning.publish import ParameterStore, Version
from online_learning.ranker import Inputs
from online_learning.recommender import OnlineRecommender
from online_learning.threads import one_thread
from streaming.ranking_inputs import RankingInputs
from streaming.state import Ev, Spec

SLOW_PUBLISH_MS = 250  # logged: learning and publishing wait meanwhile


def new_recommender(s: Settings) -> OnlineRecommender:
    return OnlineRecommender.default(min_count=s.min_count, ttl_ms=s.param_ttl_seconds * 1000,
                                     max_rows=s.embedding_rows, inputs=Inputs.of(load_ranking(s.features)))


def rebuild(chain: list[Version], rec: OnlineRecommender | None = None) -> OnlineRecommender | None:
    """Apply a chain from :meth:`ParameterStore.catch_up` (a snapshot first, or deltas on ``rec``)."""
    for ver in chain:
        if ver.kind == "snapshot" and ver.blobs:  # without blobs: one equal to the state we have
            rec = OnlineRecommender.restore(ver.blobs)
        elif rec is not None:
            for blob in ver.blobs.values():
                rec.apply_delta(blob)
    return rec


class Trainer:
    def __init__(self, settings: Settings, log: Any = None) -> None:
        self.settings = settings
        self.log = log or (lambda m: print(f"[trainer] {m}", file=sys.stderr, flush=True))
        self.client = redis.Redis.from_url(settings.redis_url)
        self.store = ParameterStore(self.client, settings.feast_project)
        self.gate = QualityGate(max_abs=settings.gate_max_abs, margin=settings.gate_margin)
        self.topic = examples_topic(settings)
        self.offsets: dict[int, int] = {}
        self.epoch: str | None = None  # the log epoch the offsets belong to (connectors/log_epoch.py)
        self.version = 0
        chain = self.store.catch_up(0)
        rec = rebuild(chain)
        if rec is None:
            self.rec = new_recommender(settings)
            self.log("no published model: starting fresh")
        else:
            self.rec = rec
            self.version = chain[-1].version
            self.offsets = {int(p): o for p, o in chain[-1].meta.get("offsets", {}).items()}
            self.epoch = chain[-1].meta.get("epoch")
            self.rec.ranker.pin()
            inputs = Inputs.of(load_ranking(settings.features))
            if inputs != rec.ranker.inputs:  # the ranking service changed: new inputs start at weight 0
                self.log(f"the ranking service changed: the ranker weighs {inputs} (was {rec.ranker.inputs})")
                rec.ranker.use(inputs)
            self.log(f"resumed at version {self.version} (snapshot {chain[0].version} + {len(chain) - 1} deltas), "
                     f"offsets {self.offsets}")
        self.rec.forget_delta()  # what was rebuilt is published already
        self.need_snapshot = rec is None
        self.learned = 0
        self.last_kind = ""
        self.stopping = threading.Event()  # set to stop run() (it publishes a last snapshot first)
        self.stopped = threading.Event()  # set when run() has returned

    # -- learning -------------------------------------------------------------------------------
    def learn(self, examples: list[Example]) -> None:
        """Learn a run of examples, one event's worth (same user and time) at a time."""
        i = 0
        while i < len(examples):
            j = i + 1
            while j < len(examples) and examples[j]["user_id"] == examples[i]["user_id"] \
                    and examples[j]["ts"] == examples[i]["ts"]:
                j += 1
            group = examples[i:j]
            for ex, scored in zip(group, self.rec.learn_many(group), strict=True):
                if scored is not None:
                    self.gate.observe(scored[0], ex["label"], scored[1])
            self.learned += len(group)
            i = j

    # -- publishing -----------------------------------------------------------------------------
    def follow(self) -> None:
        """Load versions published by someone else (a rollback) before building on our own."""
        head = self.store.head()
        if head == self.version:
            return
        chain = self.store.catch_up(self.version)
        rec = rebuild(chain, self.rec)
        if rec is not None and chain:
            self.rec, self.version = rec, chain[-1].version
            self.rec.ranker.pin()
            self.rec.forget_delta()
            self.log(f"following version {self.version} published elsewhere"
                     + (f" (rollback to {chain[-1].meta['rollback_of']})" if "rollback_of" in chain[-1].meta else ""))

    def publish(self, snapshot: bool = False) -> int | None:
        """Publish what changed (or everything); None when nothing changed or the gate refused.
        Changes leave the models' change sets only once published: a refused delta's rows go
        out with the next one, so readers never have to load a whole snapshot after a refusal
        (the API took seconds to, which showed as multi-second event -> visible outliers)."""
        started = time.perf_counter()
        self.rec.embedding.step()  # examples waiting for a full batch belong in what goes out
        if snapshot and not self.need_snapshot and self.publish(snapshot=False) is None and self.rec.has_changes:
            return None  # the delta before it was refused: the snapshot's base would not be published
        snapshot = snapshot or self.need_snapshot
        # A periodic snapshot follows a delta and equals the state at that version (its base), so
        # readers there skip it; the first one stands alone (base 0) and everyone loads it.
        base = self.version if snapshot and not self.need_snapshot else 0
        blobs = self.rec.snapshot() if snapshot else self.rec.state_delta(keep=True)
        if not blobs:
            return None
        reason = None
        for name, blob in blobs.items():
            reason = self.gate.check(decode(blob)[1])
            if reason:
                reason = f"{name}: {reason}"
                break
        if reason:
            self.log(f"refused to publish {'a snapshot' if snapshot else 'a delta'}: {reason}")
            return None
        auc = self.gate.auc()
        meta = {"offsets": {str(p): o for p, o in self.offsets.items()}, "epoch": self.epoch, "auc": auc,
                "examples": self.learned}
        self.version = self.store.publish("snapshot" if snapshot else "delta", blobs,
                                          base if snapshot else self.version, meta)
        self.rec.forget_delta()  # published: the next delta starts from here
        self.rec.ranker.pin()  # what serves from now on: the gate's reference
        self.need_snapshot = False
        self.last_kind = "snapshot" if snapshot else "delta"
        took_ms = (time.perf_counter() - started) * 1000
        if took_ms > SLOW_PUBLISH_MS:
            self.log(f"publishing version {self.version} ({self.last_kind}) took {took_ms:.0f} ms")
        return self.version

    # -- the loop -------------------------------------------------------------------------------
    def run(self, stop_after_idle_s: float | None = None) -> int:
        """Consume until SIGTERM/SIGINT (or, for tests, ``stop_after_idle_s`` without examples)."""
        if stop_after_idle_s is None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stopping.set())
        s = self.settings
        watch = EpochWatch(s.kafka_bootstrap, topic_plan(s), epoch_topic(s), s.broker_check_ms)
        if self.offsets and self.epoch not in (None, watch.current.id):
            self.log(f"the published offsets belong to log epoch {self.epoch}; the broker's log is epoch "
                     f"{watch.current} (it lost its data): reading {self.topic} from its start")
            self.offsets = {}
        self.epoch = watch.current.id
        c = consumer(s.kafka_bootstrap, group=None, enable_auto_commit=False, fetch_max_wait_ms=s.fetch_wait_ms)
        self._assign(c)
        last_pub = last_snap = last_example = time.monotonic()
        self.log(f"reading {self.topic} at {s.kafka_bootstrap}, publishing to {s.redis_url} "
                 f"every {s.publish_interval_ms} ms")
        try:
            while not self.stopping.is_set():
                examples: list[Example] = []
                for tp, records in c.poll(timeout_ms=20, max_records=2000).items():
                    for r in records:
                        examples.append(json.loads(r.value))
                        self.offsets[tp.partition] = r.offset + 1
                if examples:
                    self.learn(examples)
                    last_example = time.monotonic()
                new = watch.changed()
                if new is not None:
                    self.log(f"WARNING: the broker lost its log (new log epoch {new}); what was learned is kept, "
                             f"and {self.topic} is read again from its start")
                    self.epoch, self.offsets = new.id, {}
                    self._assign(c)
                now = time.monotonic()
                if (now - last_pub) * 1000 >= s.publish_interval_ms:
                    self.last_kind = ""
                    self._publish_safely(now - last_snap >= s.snapshot_interval_seconds)
                    last_pub = now
                    if self.last_kind == "snapshot":
                        last_snap = now
                if stop_after_idle_s is not None and now - last_example > stop_after_idle_s:
                    break
            self._publish_safely(snapshot=True)
        finally:
            watch.close()
            c.close()
            self.stopped.set()
        return self.learned

    def _assign(self, c: Any) -> None:
        """Read every partition of the examples topic from our offsets, or from its start."""
        parts = sorted(c.partitions_for_topic(self.topic) or {0})
        tps = [TopicPartition(self.topic, p) for p in parts]
        c.assign(tps)
        for tp in tps:
            if tp.partition in self.offsets:
                c.seek(tp, self.offsets[tp.partition])
            else:
                c.seek_to_beginning(tp)

    def _publish_safely(self, snapshot: bool) -> None:
        for attempt in range(6):
            try:
                self.follow()
                self.publish(snapshot)
                return
            except redis.RedisError as exc:  # Redis restarting: keep learning, publish when it is back
                if attempt == 5:
                    self.log(f"Redis unreachable, will retry at the next publish: {exc}")
                    return
                time.sleep(min(0.05 * 2**attempt, 1.0))


def learn_log(settings: Settings, events: list[Any], progress: bool = True,
              from_offline_store: bool = False) -> tuple[OnlineRecommender, Any, int]:
    """Learn a historical log with the batch example builder; returns the models, the example
    source and the number of examples. The features are the streaming job's state code run over
    the log (:class:`BatchExamples`, whose state is then the job's at the end of the log), or,
    ``from_offline_store``, the values the job logged (:class:`OfflineExamples`)."""
    from tqdm import tqdm

    from online_learning.offline_examples import offline_examples

    rec = new_recommender(settings)
    evs = [Ev.of(e) for e in events]
    builder = ExampleBuilder.of(settings)
    source = (offline_examples(settings, evs, builder) if from_offline_store
              else BatchExamples(builder, Spec.of(settings), RankingInputs(load_ranking(settings.features))))
    n = 0
    for ev in tqdm(evs, unit="ev", disable=None if progress else True, file=sys.stderr, mininterval=0.5,
                   desc="learning"):
        examples = source.add(ev)
        if examples:  # None for a duplicate
            rec.learn_many(examples)
            n += len(examples)
    rec.embedding.step()
    return rec, source, n


def warm_start(settings: Settings, events: list[Any], progress: bool = True,
               from_offline_store: bool = False) -> tuple[int, dict[str, Any]]:
    """:func:`learn_log`, published as a snapshot; returns its version and what it learned (the
    snapshot's meta). A running trainer follows it and learns on from there; the API serves it."""
    rec, source, n = learn_log(settings, events, progress, from_offline_store)
    store = ParameterStore(redis.Redis.from_url(settings.redis_url), settings.feast_project)
    meta = {"examples": n, "warm_start": len(events), "features": "offline store" if from_offline_store else "log"}
    if from_offline_store and source.missing:
        meta["missing_user_features"] = source.missing
    # No offsets: they belong to the examples topic, which this log never went through.
    version = store.publish("snapshot", rec.snapshot(), 0, meta)
    return version, meta


def main() -> int:
    one_thread()  # two cores, shared with the Flink job and the API
    settings = Settings.from_env()
    trainer = Trainer(settings)
    n = trainer.run()
    trainer.log(f"stopped after {n} examples at version {trainer.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
