"""Stopping: nothing hangs on a broker that is gone, and `freshrec down` leaves nothing running."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from connectors.embedded import start_broker
from connectors.kafka import BrokerError, EventProducer, ensure_topics
from connectors.schema import validate
from freshrec.stack import down
from jobs.catalogue_job import session_nice


def test_producer_does_not_hang_when_the_broker_goes(tmp_path: Path) -> None:
    broker = start_broker(tmp_path)
    bootstrap = f"127.0.0.1:{broker.port}"
    ensure_topics(bootstrap, {"gone-events": 1, "gone-dlq": 1})
    event = validate({"user_id": "u", "item_id": "i", "behavior": "view", "ts": int(time.time() * 1000)})
    p = EventProducer(bootstrap, "gone-events", "gone-dlq")
    p.send_valid(event)
    p.flush()
    broker.stop()

    p.send_valid(event)
    started = time.monotonic()
    with pytest.raises(BrokerError, match="did not acknowledge records within 2s"):
        p.flush(timeout_s=2)
    with pytest.raises(KeyboardInterrupt), p:  # as on Ctrl-C during a replay
        raise KeyboardInterrupt
    assert time.monotonic() - started < 15


def test_api_answers_503_quickly_without_a_broker(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from connectors.embedded import free_port
    from freshrec.config import Settings
    from serving.app import create_app

    api = TestClient(create_app(Settings(kafka_bootstrap=f"127.0.0.1:{free_port()}", state_dir=tmp_path)))
    event = {"user_id": "u", "item_id": "i", "behavior": "view", "ts": int(time.time() * 1000)}
    for _ in range(2):  # and again: a failed producer is dropped, the next request tries anew
        started = time.monotonic()
        answer = api.post("/events", json=[event])
        assert answer.status_code == 503 and "nothing acknowledged" in answer.json()["detail"]
        assert time.monotonic() - started < 15


def _child(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def test_down_asks_the_owner_then_stops_what_is_left(tmp_path: Path) -> None:
    marker = tmp_path / "owner-stopped"
    # The `up` process: stops cleanly on SIGTERM, and says so.
    owner = _child("import pathlib, signal, sys, time\n"
                   f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(marker)!r}).touch(), sys.exit(0)))\n"
                   "time.sleep(60)")
    # A child it left behind that ignores SIGTERM, like a JVM running its shutdown hooks.
    stubborn = _child("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)")
    service = _child("import time\ntime.sleep(60)")
    time.sleep(0.5)  # let them install their handlers
    (tmp_path / "stack.json").write_text(json.dumps({
        "pids": {"feature_job": stubborn.pid, "broker": service.pid}, "services": ["broker"], "owner": owner.pid}))

    assert down(tmp_path) == ["feature_job", "broker"]
    for proc in (owner, stubborn, service):
        proc.wait(5)
    assert marker.exists()
    assert stubborn.returncode == -9 and service.returncode != 0
    assert not (tmp_path / "stack.json").exists()


def test_a_niced_catalogue_job_puts_its_whole_session_behind() -> None:
    """Autogroup scheduling shares CPU between sessions before nice counts: the job that leads
    its session (as `freshrec up` starts it) renices the session; one started from a shell
    leaves the shell's session alone and says how to do better."""
    code = ("import os\nfrom jobs.catalogue_job import lower_priority, session_nice\n"
            "show = lambda n: '-' if n is None else n\nbefore = show(session_nice())\nlower_priority(7)\n"
            "print(before, os.getpriority(os.PRIO_PROCESS, 0), show(session_nice()))")
    root = Path(__file__).resolve().parent.parent

    def run(new_session: bool) -> list[str]:
        out = subprocess.run([sys.executable, "-c", code], cwd=root, start_new_session=new_session,
                             capture_output=True, text=True, check=True, timeout=60)
        return out.stdout.strip().splitlines()

    ours = session_nice()  # None where this session is the root group (CI sandboxes): no hint then
    leader, member = run(new_session=True), run(new_session=False)
    before, *after = leader[-1].split()
    assert after == ["7", "7" if before != "-" else "-"]  # a new session's own group, reniced
    assert member[-1] == f"{'-' if ours is None else ours} 7 {'-' if ours is None else ours}"  # ours untouched
    if ours is not None:
        assert "setsid" in member[0]


def test_session_nice_reads_only_a_real_autogroup(tmp_path: Path) -> None:
    group = tmp_path / "autogroup"
    assert session_nice(group) is None  # a kernel without autogroup
    group.write_text("")
    assert session_nice(group) is None  # the root group: nice alone ranks the process
    group.write_text("/autogroup-42 nice 3\n")
    assert session_nice(group) == 3
