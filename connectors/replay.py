"""Replay a behavior log into Kafka in event-time order, at a chosen pace.

Pacing: ``speed`` = multiple of real time (60 = an hour of log per minute), ``rate`` = events
per second, neither = as fast as the producer goes. Bad rows go to the DLQ with the reason.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from connectors.kafka import EventProducer, ProduceStats
from connectors.logfile import open_log
from connectors.schema import MIN_TS_MS, BehaviorEvent, InvalidEvent, validate


def sorted_events(path: Path, fmt: str, refuse: Callable[[str, InvalidEvent], Any],
                  min_ts_ms: int = MIN_TS_MS) -> list[BehaviorEvent]:
    """Validate a whole file and sort the good events by event time; each bad row goes to
    ``refuse(line, error)`` (a producer's ``send_dead_letter``, or a counter), none silently."""
    events: list[BehaviorEvent] = []
    now_ms = int(time.time() * 1000)
    for row, line in open_log(path, fmt):
        try:
            if row is None:
                raise InvalidEvent("payload", "line does not split into the expected columns")
            events.append(validate(row, now_ms, min_ts_ms))
        except InvalidEvent as err:
            refuse(line, err)
    events.sort(key=lambda e: e.ts)  # stable: ties keep file order
    return events


class Pacer:
    """Sleeps so that events leave at the asked speed or rate."""

    def __init__(self, speed: float | None = None, rate: float | None = None) -> None:
        if speed is not None and rate is not None:
            raise ValueError("give --speed or --rate, not both")
        if (speed is not None and speed <= 0) or (rate is not None and rate <= 0):
            raise ValueError("--speed and --rate must be greater than 0")
        self.speed, self.rate = speed, rate
        self.start_wall = 0.0
        self.start_ts: int | None = None
        self.n = 0

    def wait(self, ts: int) -> None:
        if self.start_ts is None:
            self.start_ts, self.start_wall = ts, time.monotonic()
        if self.speed:
            due = self.start_wall + (ts - self.start_ts) / 1000.0 / self.speed
        elif self.rate:
            due = self.start_wall + self.n / self.rate
        else:
            return
        self.n += 1
        delay = due - time.monotonic()
        if delay > 0.001:
            time.sleep(delay)


def replay(
    events: Iterable[BehaviorEvent | dict[str, Any]],
    producer: EventProducer,
    speed: float | None = None,
    rate: float | None = None,
    total: int | None = None,
    progress: bool = True,
) -> ProduceStats:
    """Produce events in the order given (already event-time ordered), paced."""
    pacer = Pacer(speed, rate)
    # disable=None: a bar on a terminal only (a log file would fill with carriage returns).
    bar = tqdm(total=total, unit="ev", disable=None if progress else True, file=sys.stderr, mininterval=0.5,
               desc="replay")
    try:
        for ev in events:
            if isinstance(ev, BehaviorEvent):
                pacer.wait(ev.ts)
                producer.send_valid(ev)
            else:
                result = producer.send(ev)
                if isinstance(result, BehaviorEvent):
                    pacer.wait(result.ts)
            bar.update(1)
            if bar.n % 1000 == 0:
                bar.set_postfix(dlq=producer.stats.rejected, refresh=False)
        producer.flush()
    finally:
        bar.close()
    return producer.stats

