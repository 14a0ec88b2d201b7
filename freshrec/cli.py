"""freshrec: real-time recommendations from a streaming feature pipeline.

  freshrec up [--demo | --log FILE] [--fresh]   start broker, Redis, the Flink jobs, the trainer and the API
  freshrec replay FILE                stream a behavior log into the running stack
  freshrec status [--json]            each part up or down, how far behind, what happened
  freshrec down                       stop a stack started in another terminal
  freshrec doctor                     check Java, jars, binaries and ports
  freshrec init                       create topics, register feature views (for external Kafka/Redis)
  freshrec config                     every FRESHREC_* setting with its default
  freshrec deploy [--print | --submit] [--job J]  topic plan and the `flink run` for a Flink cluster (FRESHREC_FLINK_*)
  freshrec evaluate --source FILE     prequential top-K evaluation of the online models and baselines
                 [--features none|a,b]  ... with other definitions for the ranker to weigh
  freshrec model [list | rollback --to VERSION]   published model versions; serve an older snapshot again
  freshrec train --source FILE        warm start: learn a historical log, publish the models as a snapshot
                 [--from-offline-store]  ... with the features the offline store logged
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from types import FrameType

from connectors.logfile import FORMATS
from freshrec.config import ConfigError, Settings


class UserError(Exception):
    """Printed as one line, without a traceback."""


def cli_settings() -> Settings:
    """Environment first; where it is silent, the ports of a stack started by `freshrec up`."""
    from serving.status import stack_doc

    settings = Settings.from_env()
    doc = stack_doc(settings.state_dir)
    if doc is None:
        return settings
    merged = {**doc["settings"], **{k: v for k, v in os.environ.items() if k.startswith("FRESHREC_")}}
    return Settings.from_env(merged)


def cmd_setup(args: argparse.Namespace) -> int:
    from streaming.jars import ensure_jars

    for path in ensure_jars():
        print(f"ok  {path}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """Create the topics and register the feature views: the one-time step of a deployment."""
    from features.store import apply
    from jobs.topics import prepare_log, topic_plan

    s = Settings.from_env()
    epoch = prepare_log(s)
    apply(s)
    print("topics: " + ", ".join(f"{t} ({n} partitions)" for t, n in topic_plan(s).items()))
    print(f"log epoch {epoch}")
    print(f"feature views registered in Feast project {s.feast_project}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from connectors.embedded import ServiceError, alive, redis_binary, tansu_binary
    from freshrec.stack import wait_port_free
    from serving.status import stack_doc
    from streaming.jars import functions_jar_path, missing_jars

    settings = Settings.from_env()
    problems = 0

    def report(ok: bool, what: str, fix: str = "") -> None:
        nonlocal problems
        problems += not ok
        print(f"{'ok ' if ok else 'NO '} {what}" + ("" if ok else f"\n    fix: {fix}"))

    java = shutil.which("java")
    version = ""
    if java:
        out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
        version = out.splitlines()[0] if out else ""
    report(bool(java) and any(f'"{v}' in version for v in ("11", "17", "21")), f"Java: {version or 'not found'}",
           "install OpenJDK 17 (apt-get install openjdk-17-jdk-headless); Flink 2.3 runs on Java 11/17/21")
    missing = missing_jars()
    report(not missing, "Kafka connector jars" + (f" missing: {', '.join(map(str, missing))}" if missing else ""),
           "run `freshrec setup` (downloads them once, verified by hash)")
    javac, functions = shutil.which("javac"), functions_jar_path()
    report(bool(javac), f"javac (compiles streaming/java): {javac or 'not found'}",
           "install a JDK 17 (apt-get install openjdk-17-jdk-headless)")
    report(functions.exists(), f"freshrec's Flink SQL functions: {functions}", "run `freshrec setup` (compiles them)")
    for name, find in (("Tansu broker", tansu_binary), ("redis-server", redis_binary)):
        try:
            report(True, f"{name}: {find()}")
        except ServiceError as exc:
            report(False, name, str(exc))
    doc = stack_doc(settings.state_dir)
    if doc is not None and alive(doc.get("owner", 0)):
        report(True, f"a stack is running here: its API at {doc['api']} (live page {doc['api']}/ui/)")
    else:
        try:
            wait_port_free(settings.api_port)
            report(True, f"API port {settings.api_port} is free")
        except ServiceError as exc:
            report(False, f"API port {settings.api_port} is taken", str(exc))
    print("all good" if not problems else f"{problems} problem(s)")
    return 1 if problems else 0


def cmd_up(args: argparse.Namespace) -> int:
    from connectors.embedded import ServiceError
    from connectors.kafka import BrokerError
    from freshrec.stack import Stack, wait_port_free
    from serving.status import stack_doc

    settings = Settings.from_env()
    if stack_doc(settings.state_dir):
        raise UserError(f"a stack is already running (see {settings.state_dir}/stack.json); `freshrec down` first")
    wait_port_free(settings.api_port)
    stop = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    # Ctrl-C stops the stack even when `up` was started by a script that ignores SIGINT (a
    # background job of a shell inherits SIG_IGN).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stack = Stack.start(settings, log=lambda m: print(m, flush=True), fresh=args.fresh)
    gave_up: list[ServiceError] = []
    done = threading.Event()

    def supervise() -> None:  # in the background, so that it also runs while a log is fed
        while not done.wait(1):
            try:
                stack.supervise(log=lambda m: print(f"restarted {m}", flush=True))
            except (ServiceError, BrokerError) as exc:
                gave_up.append(exc)
                os.kill(os.getpid(), signal.SIGTERM)  # the main thread stops the stack
                return

    supervisor = threading.Thread(target=supervise, name="supervisor", daemon=True)
    supervisor.start()
    try:
        s = stack.settings
        flink = "".join(f"  Flink UI  {url}  ({name})\n" for name, url in stack.flink_ui.items())
        print(f"\nfreshrec is up\n  live page {stack.api_url}/ui/\n  API       {stack.api_url}/docs\n"
              f"{flink}  broker    {s.kafka_bootstrap}\n  Redis     {s.redis_url}\n  logs      {stack.log_dir}/\n"
              f"  try       curl '{stack.api_url}/recommendations?user_id=1&k=10'\n", flush=True)
        if args.demo or args.log:
            _feed(s, args, stack.api_url)
        print("running; Ctrl-C stops everything", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    finally:
        done.set()
        supervisor.join(60)
        stack.stop()
    if gave_up:
        raise UserError(f"stopped the stack: {gave_up[0]}")
    print("stopped")
    return 0


def _feed(s: Settings, args: argparse.Namespace, api_url: str) -> None:
    """Replay a log, or simulated behavior, into the stack."""
    from connectors.kafka import BrokerError
    from freshrec.demo import feed, try_it

    def say(m: str) -> None:
        print(m, flush=True)

    try:
        if args.log:
            _replay_log(s, Path(args.log), "auto", speed=args.speed)
            return
        say(f"sending {args.events:,} simulated events, stamped with the clock, at up to {args.rate:g}/s: "
            "slower while the Flink jobs fall behind")
        try_it(api_url, log=say)
        sent = feed(s, args.events, args.rate, log=say)
        say(f"demo: all {sent:,} simulated events sent")
    except BrokerError as exc:  # the stack itself keeps running (and restarts the broker)
        say(f"the demo traffic stopped: {exc}")


def _replay_log(s: Settings, path: Path, fmt: str, speed: float | None = None, rate: float | None = None,
                limit: int | None = None, progress: bool = True) -> None:
    """Validate a log (bad rows to the DLQ), sort it by event time and produce it, paced."""
    from connectors.kafka import EventProducer
    from connectors.logfile import LogFormatError
    from connectors.replay import replay, sorted_events

    with EventProducer(s.kafka_bootstrap, s.events_topic, s.dlq_topic, source="replay") as producer:
        try:
            events = sorted_events(path, fmt, producer.send_dead_letter)
        except LogFormatError as exc:
            raise UserError(str(exc)) from None
        if limit:
            events = events[:limit]
        print(f"{len(events)} valid events, {producer.stats.rejected} refused (sent to {s.dlq_topic}); "
              f"producing to {s.events_topic} at {s.kafka_bootstrap}", file=sys.stderr, flush=True)
        stats = replay(events, producer, speed=speed, rate=rate, total=len(events), progress=progress)
    print(f"done: {stats.accepted} produced, {stats.rejected} to the DLQ"
          + (f" ({', '.join(f'{k}: {v}' for k, v in stats.reasons.items())})" if stats.reasons else ""), flush=True)


def cmd_replay(args: argparse.Namespace) -> int:
    _replay_log(cli_settings(), Path(args.file), args.format, args.speed, args.rate, args.limit, not args.quiet)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from serving.status import as_json, collect, recent_events, render, stack_doc

    s = cli_settings()
    doc = stack_doc(s.state_dir)
    if doc is None:
        print("no stack running here (start one with `freshrec up`)")
        return 1
    parts, events = collect(s, doc), recent_events(s.state_dir)
    print(as_json(parts, events) if args.json else render(parts, events))
    return 0 if all(p.state != "DOWN" for p in parts) else 1


def cmd_down(args: argparse.Namespace) -> int:
    from freshrec.stack import down

    stopped = down(Settings.from_env().state_dir)
    print("stopped " + ", ".join(stopped) if stopped else "nothing was running")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from connectors.logfile import LogFormatError
    from freshrec.evaluate import evaluate, format_table, ranking_of

    source = Path(args.source)
    ranking = ranking_of(Settings.from_env().features, args.features)  # a DefinitionError names the problem
    try:
        report = evaluate(source, args.format, Path(args.out), args.limit, progress=not args.quiet, ranking=ranking)
    except LogFormatError as exc:
        raise UserError(str(exc)) from None
    print("ranker inputs: the built-in views" + "".join(f", {n}" for n in report["ranking_features"]))
    print(f"{report['events']:,} events from {source} in {report['seconds']} s "
          f"({report['events_per_second']:,} events/s)"
          + (f"; refused: {report['refused']}" if report["refused"] else ""))
    print(format_table(report))
    print(f"\nwrote {args.out}/evaluate.json and {args.out}/evaluate.png")
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    import redis

    from online_learning.publish import ParameterStore

    s = cli_settings()
    store = ParameterStore(redis.Redis.from_url(s.redis_url, socket_timeout=5), s.feast_project)
    try:
        if args.action == "rollback":
            if args.to is None:
                raise UserError("rollback needs --to VERSION (a snapshot; `freshrec model list` shows them)")
            version = store.rollback(args.to)
            print(f"published snapshot {args.to} again as version {version}; the API and the trainer follow it "
                  f"within FRESHREC_MODEL_POLL_MS / FRESHREC_PUBLISH_INTERVAL_MS")
            return 0
        history = store.history()
        if not history:
            print(f"no model published in project {s.feast_project} yet (is the trainer running?)")
            return 1
        print(f"newest version {history[-1]['version']}; snapshots kept (rollback targets): "
              f"{', '.join(map(str, store.snapshots())) or 'none'}")
        for v in history:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["created_ms"] / 1000))
            extra = f", rollback of {v['rollback_of']}" if v["rollback_of"] is not None else ""
            auc, examples = v["auc"], "?" if v["examples"] is None else v["examples"]
            print(f"  v{v['version']:<8} {v['kind']:8} {when}  examples {examples:>9}  "
                  f"AUC {auc if auc is None else round(auc, 4)}{extra}")
    except redis.RedisError as exc:
        raise UserError(f"Redis at {s.redis_url} unreachable: {exc}") from None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import redis

    from connectors.logfile import LogFormatError
    from freshrec.evaluate import load_events
    from online_learning.offline_examples import OfflineStoreError
    from online_learning.trainer import warm_start

    s = cli_settings()
    try:
        events, refused = load_events(Path(args.source), args.format, args.limit)
    except LogFormatError as exc:
        raise UserError(str(exc)) from None
    if not events:
        raise UserError(f"{args.source}: no valid events" + (f" (refused: {dict(refused)})" if refused else ""))
    if refused:
        print(f"refused {sum(refused.values())} rows: {dict(refused)}", file=sys.stderr)
    if args.from_offline_store and not args.quiet:
        print("features: as logged in the offline store, point in time", file=sys.stderr)
    try:
        version, meta = warm_start(s, events, progress=not args.quiet, from_offline_store=args.from_offline_store)
    except redis.RedisError as exc:
        raise UserError(f"Redis at {s.redis_url} unreachable: {exc}") from None
    except OfflineStoreError as exc:
        raise UserError(str(exc)) from None
    if meta.get("missing_user_features"):
        print(f"{meta['missing_user_features']:,} events of users with earlier events found no logged user "
              "features before them (the offline store holds what the feature job read while it ran); they "
              "learned as a new user's", file=sys.stderr)
    print(f"learned {meta['examples']:,} examples from {len(events):,} events; published as snapshot version "
          f"{version} (project {s.feast_project}); a running trainer and the API follow it")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from freshrec.deploy import describe, submit

    s = Settings.from_env()
    try:
        print(describe(s, args.job), flush=True)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return submit(s, args.job) if args.submit else 0


def cmd_config(args: argparse.Namespace) -> int:
    for name, default, doc in Settings.describe():
        print(f"{name:36} {default:28} {doc}")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from features.dsl import load, load_ranking
    from features.registry import plan
    from features.store import apply, feature_store

    s = Settings.from_env()
    defs = load(s.features)  # a DefinitionError lists every problem, by definition and field
    ranking = load_ranking(s.features)
    if args.action == "validate":
        from streaming.sql import split

        compiled, rest = split(defs)
        print(f"{len(defs)} definitions in {s.features}: valid")
        print(f"  the backfill runs {len(compiled)} as Flink SQL: {', '.join(d.name for d in compiled) or '-'}")
        print(f"  and {len(rest)} on Python operators: {', '.join(d.name for d in rest) or '-'}")
        print("  (the stream runs every definition on Python operators)")
        print(f"  the ranker weighs the built-in views and {len(ranking.features)} of them: "
              + (", ".join(d.name for d in ranking.features) or "-"))
        return 0
    if args.action == "parity":
        if not args.source:
            raise UserError("give the log to compare on: --source FILE")
        from features.parity import run

        report = run(Path(args.source), s, args.format)
        print(report.render(show=args.show))
        return 0 if not report.mismatches else 1
    try:
        store = feature_store(s)
        registered = store.list_feature_views()
        service = next((f for f in store.list_feature_services() if f.name == ranking.name), None)
    except Exception:  # noqa: BLE001 - no registry yet: everything is new
        registered, service = [], None
    changes = plan(defs, registered, ranking, service)
    print(changes.render())
    if args.action == "apply" and not changes.empty:
        apply(s)
        print(f"applied to the Feast registry of project {s.feast_project}")
        if changes.restarts:
            print(f"restart {', '.join(changes.restarts)} (`freshrec down` / `freshrec up`, or `freshrec deploy "
                  "--submit` on a cluster; checkpoints keep the other features' state)")
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    from jobs.backfill import BackfillError, backfill, parse_time

    s = Settings.from_env()
    try:
        report = backfill(s, [Path(p) for p in args.source], parse_time(args.start, "--from"),
                          parse_time(args.end, "--to"), fmt=args.format, materialize=args.materialize,
                          progress=not args.quiet)
    except BackfillError as exc:
        raise UserError(str(exc)) from None
    if report.staged is not None:
        print(f"wrote {len(report.days_written)} days ({report.staged.events:,} events, "
              f"{report.events_per_s:,.0f} events/s); refused rows are in {report.rejected_file}")
    return 0


def log_source(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of a command that reads a whole log (evaluate, train)."""
    p.add_argument("--source", required=True, help="Taobao CSV, MovieLens u.data, CSV with header, or JSONL")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--limit", type=int, help="only the first N events (in time order)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="freshrec", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("setup", help="fetch the Kafka connector jars for Flink").set_defaults(func=cmd_setup)
    sub.add_parser("doctor", help="check Java, jars, binaries and ports").set_defaults(func=cmd_doctor)
    sub.add_parser("init", help="create topics and register feature views (external Kafka/Redis)").set_defaults(
        func=cmd_init)
    up = sub.add_parser("up", help="start the embedded stack")
    up.add_argument("--demo", action="store_true", help="feed simulated behavior once the stack is up")
    up.add_argument("--log", help="feed this log file (Taobao CSV, CSV or JSONL) instead of simulated behavior")
    up.add_argument("--speed", type=float, default=60.0, help="replay speed for --log, x real time")
    up.add_argument("--rate", type=float, default=200.0,
                    help="most events/s of simulated behavior (it slows down while the jobs fall behind)")
    up.add_argument("--events", type=int, default=200_000, help="how many simulated events")
    up.add_argument("--fresh", action="store_true",
                    help="start empty: remove the features, model versions and checkpoints an earlier `up` kept")
    up.set_defaults(func=cmd_up)
    rp = sub.add_parser("replay", help="stream a behavior log into the running stack, in event-time order")
    rp.add_argument("file")
    rp.add_argument("--format", default="auto", choices=FORMATS)
    pace = rp.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=float, help="multiple of real time (60 = one hour of log per minute)")
    pace.add_argument("--rate", type=float, help="events per second")
    rp.add_argument("--limit", type=int, help="only the first N events")
    rp.add_argument("--quiet", action="store_true", help="no progress bar")
    rp.set_defaults(func=cmd_replay)
    st = sub.add_parser("status", help="each part: up/down, how far behind, last checkpoint, model version, DLQ")
    st.add_argument("--json", action="store_true", help="machine-readable")
    st.set_defaults(func=cmd_status)
    sub.add_parser("down", help="stop a stack started by `freshrec up`").set_defaults(func=cmd_down)
    sub.add_parser("config", help="list every FRESHREC_* setting").set_defaults(func=cmd_config)
    dp = sub.add_parser("deploy", help="the topic plan and the `flink run` that submits the job to a cluster")
    how = dp.add_mutually_exclusive_group()
    how.add_argument("--print", action="store_true", help="print them (the default)")
    how.add_argument("--submit", action="store_true", help="print them, then run `flink run`")
    dp.add_argument("--job", choices=["feature_job", "catalogue_job"],
                    help="only this job (e.g. the catalogue job after a catalogue change); default: every job")
    dp.set_defaults(func=cmd_deploy)
    ev = log_source(sub.add_parser("evaluate", help="prequential top-K evaluation of the online models and "
                                                    "baselines on a log"))
    ev.add_argument("--out", default="bench/results", help="where evaluate.json and evaluate.png go")
    ev.add_argument("--features", help="the definitions the ranker weighs beyond the built-in views, comma-separated "
                                       "(`none`: only those); default: the catalogue's ranking service")
    ev.set_defaults(func=cmd_evaluate)
    md = sub.add_parser("model", help="published model versions; roll back to a snapshot")
    md.add_argument("action", nargs="?", default="list", choices=["list", "rollback"])
    md.add_argument("--to", type=int, help="the snapshot version to serve again (with rollback)")
    md.set_defaults(func=cmd_model)
    train = log_source(sub.add_parser("train", help="warm start: learn a historical log and publish the models "
                                                    "as a snapshot"))
    train.add_argument("--from-offline-store", action="store_true",
                       help="take each event's features from the offline store, as the feature job logged them "
                            "(default: recompute them from the log)")
    train.set_defaults(func=cmd_train)
    ft = sub.add_parser("features", help="the feature catalogue: validate, plan, apply, parity")
    ft.add_argument("action", choices=["validate", "plan", "apply", "parity"],
                    help="validate: check the definitions; plan: what apply would change; apply: register them in "
                         "Feast; parity: run the streaming job and the backfill on --source and compare")
    ft.add_argument("--source", help="(parity) the log to run both executors on")
    ft.add_argument("--format", default="auto", choices=FORMATS)
    ft.add_argument("--show", type=int, default=20, help="(parity) mismatches to list")
    ft.set_defaults(func=cmd_features)
    bf = sub.add_parser("backfill", help="compute the catalogue over historical logs into the offline store")
    bf.add_argument("--source", nargs="+", required=True, help="log files, read in this order")
    bf.add_argument("--from", dest="start", required=True, help="first time (ISO-8601 date/time, UTC) to write")
    bf.add_argument("--to", dest="end", required=True, help="end of the range (exclusive)")
    bf.add_argument("--format", default="auto", choices=FORMATS)
    bf.add_argument("--materialize", action="store_true", help="then load the newest values into the online store")
    bf.add_argument("--quiet", action="store_true", help="no progress bar")
    bf.set_defaults(func=cmd_backfill)
    return p


def main(argv: list[str] | None = None) -> int:
    from connectors.embedded import ServiceError
    from connectors.kafka import BrokerError

    args = parser().parse_args(argv)
    # PyFlink's own modules warn about PyFlink's deprecated APIs on import: nothing a user can act on.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"pyflink(\.|$)")
    try:
        return int(args.func(args))
    except (UserError, ConfigError, ServiceError, BrokerError, ValueError) as exc:
        print(f"freshrec {args.command}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `freshrec model list | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error as Python exits
        return 0


if __name__ == "__main__":
    sys.exit(main())
