"""Feedback ingestion and the preference store (Delta Lake tables): durable ingestion through
the Feedback service against Kafka's own Java producer, the store's materialisation rate with
one and with two store processes, event-to-store latency, and reading a 100k-pair snapshot.

1. Ingestion. A `tuneloop serve feedback` process; the benchmark sends pairwise events of
   exactly 1 KiB (serialized, as stored) to it with SubmitBatch, then as many other events
   with SubmitStream, `--batch` events per call and `--streams` calls in flight. A call
   answers once the broker acknowledged every event (idempotent producer, acks=all). Then
   `org.apache.kafka.tools.ProducerPerformance` sends the same number of records of the same
   size with the same producer settings (acks=all, idempotence, linger.ms, batch.size) to a
   fresh topic on the same broker. The ratio service/Java (one per call style) is the share
   of the broker's capacity one Feedback process delivers durably, validation, deduplication
   and gRPC included (goal: at least 0.5).
2. Materialisation, one store against two. A feedback topic and a completions topic of
   `--partitions` partitions each, filled once beforehand (`--store-events` pairwise events,
   each item judged by two annotators, two completions per pair). First one `tuneloop serve
   store` process on a fresh root and consumer group consumes them; then two processes in
   another fresh group on another fresh root consume the same topics, sharing the partitions.
   Rows/s is rows over the time from the first store reporting SERVING (its consumer starts
   just before; both processes are launched at once) until the pairs table's snapshot offsets
   of the feedback topic reach the topic's end offsets on every partition; beside it, the
   rate between the first and the last commit with rows (from the pairs table's history).
   The ratio two/one is the scaling of the consumer group (goal: at least 1.7 where the cores
   allow). The store processes' CPU time (psutil) from their SERVING to caught up, per 1000
   rows, and the machine's busy cores say whether the cores allowed it: `cpu_bound_ratio` is
   the most two stores could reach at the one-store CPU cost per row with the cores the rest
   of the machine (broker, this benchmark) left them.
3. Latency. Feedback service and store running, the completions already in the store; events
   submitted one per Submit call at `--latency-rate` per second. Latency is from just before
   the Submit call to the moment a reader of the judgements table (the last of a batch's
   three commits: a judgement stored means its rows are) sees the event committed, polling
   every `--poll-ms` (a cheap poll: the table's newest log entries, then the change data
   feed's event ids of the new commits only), p50 and p99. The store runs with its default
   batching (`batch_linger_s`), which dominates this latency; `--store-linger` changes it.
4. Snapshot read. A pairs table of `--read-rows` rows (realistic content: chat prompts,
   completions of a few hundred words) written straight through tables.append in
   `--read-commits` commits; the median of `--read-runs` reads of that version by
   `read.load_rows` (to pandas), beside pyarrow's dataset scan alone and DuckDB reading the
   same table: with its delta extension (`delta_scan`) where it is installed, otherwise over
   the table's Arrow dataset (`DeltaTable(path).to_pyarrow_dataset()`), which the result says.

    .venv/bin/python bench/bench_store.py [--events 20000] [--store-events 10000]
        [--partitions 4] [--latency-events 300] [--read-rows 100000] [--bootstrap HOST:PORT]
        [--json PATH]

The defaults are sized to finish in a few minutes on 2 cores; for a figure worth quoting use
e.g. --events 50000 --store-events 50000. Prints a summary and the ratios, then the results as
one JSON object on the last line (and in PATH with --json). Without --bootstrap it starts a
broker of its own and stops it at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import psutil
import pyarrow as pa

from bench_kafka import RECORD_BYTES, broker_at, java_producer
from tuneloop.common.local_kafka import install
from tuneloop.common.feedback_event import default_item_id
from tuneloop.common.kafka import KafkaSettings, end_offsets, ensure_topics, make_producer
from tuneloop.common.processes import ServiceProcess
from tuneloop.store import read, tables
from tuneloop.store.settings import StoreSettings
from tuneloop.v1 import completion_pb2, feedback_pb2, feedback_pb2_grpc

ACCEPTED = feedback_pb2.SUBMIT_STATUS_ACCEPTED
CHOICES = (feedback_pb2.PAIRWISE_CHOICE_A, feedback_pb2.PAIRWISE_CHOICE_B)
STORE_LOG_LEVEL = "WARNING"  # --store-log-level


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def cpus() -> int:
    """The cores this process (and the services it starts) may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --- events and completions ---


def completion_ids(pair: int) -> tuple[str, str]:
    return f"cmpl-{pair:010d}-a", f"cmpl-{pair:010d}-b"


def feedback_event(pair: int, annotator: int, size: int | None = RECORD_BYTES) -> feedback_pb2.FeedbackEvent:
    """A pairwise event as the Feedback service stores it (item id filled in), padded with a
    comment to exactly `size` bytes serialized."""
    a, b = completion_ids(pair)
    event = feedback_pb2.FeedbackEvent(
        event_id=uuid.uuid4().hex, tenant="bench", source=feedback_pb2.FEEDBACK_SOURCE_ANNOTATOR,
        annotator_id=f"annotator-{annotator:03d}", project="bench",
        pairwise=feedback_pb2.PairwiseJudgement(completion_a_id=a, completion_b_id=b,
                                                choice=CHOICES[(pair + annotator) % 2]),
    )
    # Whole seconds: a Timestamp's nanos would change the size from one event to the next.
    event.created_at.FromSeconds(int(time.time()))
    event.item_id = default_item_id(event)
    if size is not None:
        # The comment's tag and length prefix come on top of its text: count down to a fit.
        for chars in range(max(0, size - event.ByteSize()), -1, -1):
            event.comment = "x" * chars
            if event.ByteSize() <= size:
                break
        if event.ByteSize() != size:
            raise ValueError(f"cannot pad a feedback event to exactly {size} bytes (got {event.ByteSize()})")
    return event


def fill_completions(settings: KafkaSettings, topic: str, pairs: int) -> None:
    """Two completions of one prompt per pair, as the Generation service logs them."""
    producer = make_producer(settings)
    for pair in range(pairs):
        request_id = f"req-{pair:010d}"
        prompt = completion_pb2.Prompt(chat=completion_pb2.Conversation(
            messages=[completion_pb2.ChatMessage(role="user", content=f"Question {pair}: what is {pair} + {pair}?")]
        ))
        for index, (cid, text) in enumerate(zip(completion_ids(pair), (f"{2 * pair}.", f"It is {2 * pair}."),
                                                strict=True)):
            record = completion_pb2.CompletionRecord(
                completion_id=cid, request_id=request_id, conversation_id=request_id, tenant="bench",
                prompt=prompt, completion=completion_pb2.Completion(completion_id=cid, index=index, text=text),
                model=completion_pb2.ModelVersion(name="policy", version="v0001"),
            )
            record.created_at.GetCurrentTime()
            producer.send(topic, key=request_id.encode(), value=record.SerializeToString())
    producer.flush()
    producer.close()


def fill_feedback(settings: KafkaSettings, topic: str, events: int, pairs: int) -> None:
    """`events` pairwise events, keyed by item id as the Feedback service keys them."""
    producer = make_producer(settings)
    for i in range(events):
        event = feedback_event(i % pairs, i // pairs, size=None)
        producer.send(topic, key=event.item_id.encode(), value=event.SerializeToString())
    producer.flush()
    producer.close()


# --- the services ---


def feedback_env(bootstrap: str, topic: str) -> dict[str, str]:
    return {
        "TUNELOOP_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "TUNELOOP_FEEDBACK_TOPIC": topic,
        "TUNELOOP_FEEDBACK_HOST": "127.0.0.1",
        "TUNELOOP_FEEDBACK_LOG_LEVEL": "WARNING",
    }


def store_env(bootstrap: str, root: Path, tag: str, feedback_topic: str, completions_topic: str,
              linger_s: float | None) -> dict[str, str]:
    """One store's settings; replicas get the same (same group, same root)."""
    env = {
        "TUNELOOP_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "TUNELOOP_STORE_ROOT": str(root),
        "TUNELOOP_STORE_FEEDBACK_TOPIC": feedback_topic,
        "TUNELOOP_STORE_COMPLETIONS_TOPIC": completions_topic,
        "TUNELOOP_STORE_DLQ_TOPIC": f"bench.store.dlq.{tag}",
        "TUNELOOP_STORE_GROUP_ID": f"bench-store-{tag}",
        "TUNELOOP_STORE_LOG_LEVEL": STORE_LOG_LEVEL,
    }
    if linger_s is not None:
        env["TUNELOOP_STORE_BATCH_LINGER_S"] = str(linger_s)
    return env


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def metric_sums(metrics_port: int | None, names: tuple[str, ...]) -> dict[str, float]:
    """Prometheus counters of one service, summed over their labels (0 where unreadable)."""
    out = dict.fromkeys(names, 0.0)
    if metrics_port is None:
        return out
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        base = name.split("{", 1)[0]
        if base in out:
            out[base] += float(value)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children so far."""
    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def cpu_here(exclude: set[int]) -> tuple[float, float]:
    """CPU s so far of this process, and of its other children (the broker, when it started
    one), leaving out the processes in `exclude`."""
    me = psutil.Process()
    own = me.cpu_times()
    children = 0.0
    for child in me.children(recursive=True):
        if child.pid in exclude:
            continue
        try:
            t = child.cpu_times()
            children += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return own.user + own.system, children


def busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores) since boot: user (guest time is
    counted there already), nice, system and interrupts; idle, iowait and steal are not."""
    t = psutil.cpu_times()
    return t.user + t.system + sum(getattr(t, k, 0.0) for k in ("nice", "irq", "softirq"))


class PartitionsDone:
    """The pairs table's snapshot offsets of one topic, polled cheaply: one DeltaTable kept
    open and brought up to date (the newest log entries only), the app transactions of the
    topic's partitions read again only when its version moved. It gives what
    `read.current_snapshot(root, [topic]).offsets[topic]` gives, without probing every
    possible partition each time (see `check`)."""

    def __init__(self, root: Path, topic: str, partitions: list[int]) -> None:
        self.root, self.topic, self.partitions = root, topic, partitions
        self.table = None
        self.version = -1
        self.offsets: dict[int, int] = {}

    def poll(self) -> dict[int, int]:
        if self.table is None:
            self.table = tables.open_table(self.root, tables.PAIRS)
            if self.table is None:
                return {}
        else:
            self.table.update_incremental()
        if self.table.version() != self.version:
            self.version = self.table.version()
            found = {p: tables.partition_version(self.table, self.topic, p) for p in self.partitions}
            self.offsets = {p: int(v) for p, v in found.items() if v is not None}
        return self.offsets

    def reached(self, ends: dict[int, int]) -> bool:
        done = self.poll()
        return all(done.get(p, 0) >= end for p, end in ends.items())


# --- 1. ingestion: Feedback service vs Java ProducerPerformance ---


def stream_all(
    target: str, events: list[feedback_pb2.FeedbackEvent], batch: int, streams: int, rpc: str = "SubmitBatch"
) -> float:
    """Seconds to have every event acknowledged ACCEPTED, in `rpc` calls (SubmitBatch or
    SubmitStream) of `batch` events with `streams` calls in flight."""
    calls = [events[i : i + batch] for i in range(0, len(events), batch)]
    with grpc.insecure_channel(target) as channel:
        stub = feedback_pb2_grpc.FeedbackStub(channel)

        def send(call: list[feedback_pb2.FeedbackEvent]) -> int:
            if rpc == "SubmitStream":
                results = stub.SubmitStream(iter(call), timeout=120).results
            else:
                results = stub.SubmitBatch(feedback_pb2.SubmitBatchRequest(events=call), timeout=120).results
            bad = [r for r in results if r.status != ACCEPTED]
            if len(results) != len(call) or bad:
                raise RuntimeError(f"{len(bad)} of {len(call)} events not accepted, e.g. {bad[:1]}")
            return len(results)

        with ThreadPoolExecutor(streams) as pool:
            start = time.perf_counter()
            done = sum(pool.map(send, calls))
            elapsed = time.perf_counter() - start
    assert done == len(events)
    return elapsed


def ingestion(bootstrap: str, home: Path, work: Path, tag: str, args: argparse.Namespace) -> dict:
    settings = KafkaSettings(bootstrap_servers=bootstrap)
    topic, java_topic = f"bench.ingest.feedback.{tag}", f"bench.ingest.java.{tag}"
    ensure_topics(settings, [topic, java_topic])
    warmup = [feedback_event(i, 0) for i in range(min(args.batch, 500))]
    # Fresh event ids for each call style (an id sent twice is answered DUPLICATE, not produced).
    events = {rpc: [feedback_event(len(warmup) + i // 2, i % 2) for i in range(args.events)]
              for rpc in ("SubmitBatch", "SubmitStream")}
    with ServiceProcess("feedback", [], feedback_env(bootstrap, topic), work) as service:
        # Connections, the producer id and the broker's first appends, not measured.
        stream_all(service.target, warmup, args.batch, 1)
        rates = {rpc: args.events / stream_all(service.target, batch, args.batch, args.streams, rpc)
                 for rpc, batch in events.items()}
    java_rate = java_producer(home, settings, java_topic, args.events)
    service_rate, stream_rate = rates["SubmitBatch"], rates["SubmitStream"]
    return {
        "events": args.events, "record_bytes": RECORD_BYTES, "batch": args.batch, "streams": args.streams,
        "service_events_per_s": round(service_rate, 1),
        "stream_events_per_s": round(stream_rate, 1),
        "java_records_per_s": round(java_rate, 1),
        "service_mb_per_s": round(service_rate * RECORD_BYTES / 1e6, 2),
        "java_mb_per_s": round(java_rate * RECORD_BYTES / 1e6, 2),
        "ratio": round(service_rate / java_rate, 3),
        "stream_ratio": round(stream_rate / java_rate, 3),
    }


# --- 2. materialisation: one store, then two, consuming the same pre-filled topics ---


def store_topics(settings: KafkaSettings, name: str, events: int) -> tuple[str, str, int]:
    """Fresh feedback and completions topics, the completions for `events` judgements already in
    (two judgements per pair): (feedback topic, completions topic, pairs)."""
    feedback_topic, completions_topic = f"bench.{name}.feedback", f"bench.{name}.completions"
    ensure_topics(settings, [feedback_topic, completions_topic])
    pairs = max(1, events // 2)
    fill_completions(settings, completions_topic, pairs)
    return feedback_topic, completions_topic, pairs


def run_stores(count: int, bootstrap: str, work: Path, label: str, topics: tuple[str, str],
               ends: dict[int, int], events: int, args: argparse.Namespace) -> dict:
    """`count` store processes, one group, one fresh root, launched at once; timed from the
    first one SERVING until the snapshot offsets reach `ends`."""
    feedback_topic, completions_topic = topics
    root = work / f"store-{label}"
    env = store_env(bootstrap, root, label, feedback_topic, completions_topic, args.store_linger)
    services = [ServiceProcess("store", [], env, work) for _ in range(count)]
    started: dict[int, tuple[float, float]] = {}  # service index -> (SERVING at, its CPU s then)
    # When the first one was SERVING: the machine's busy CPU s, this process's and its other
    # children's (the broker's, when it is ours).
    at_first: list[tuple[float, float, float]] = []
    lock = threading.Lock()

    def start(index: int) -> None:
        services[index].start()
        at = time.perf_counter()
        cpu = cpu_seconds(services[index].proc.pid)
        with lock:
            started[index] = (at, cpu)
            if not at_first:
                at_first.append((busy_seconds(), *cpu_here(store_pids())))

    def store_pids() -> set[int]:
        out = set()
        for service in services:
            if service.proc is not None:
                out.add(service.proc.pid)
                try:
                    out |= {c.pid for c in psutil.Process(service.proc.pid).children(recursive=True)}
                except psutil.NoSuchProcess:
                    pass
        return out

    done = PartitionsDone(root, feedback_topic, sorted(ends))
    load_before = os.getloadavg()[0]
    with ExitStack() as stack:
        for service in services:
            stack.callback(service.stop)
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(start, range(count)))
        first = min(at for at, _ in started.values())

        def caught_up() -> bool:
            for service in services:
                if service.proc is None or service.proc.poll() is not None:
                    raise RuntimeError(f"a store process exited early:\n{service.log_tail()}")
            return done.reached(ends)

        try:
            wait_for(caught_up, args.timeout_store_s, f"{count} store(s) to consume {events} events",
                     interval_s=args.store_poll_ms / 1000)
        except TimeoutError as err:
            raise TimeoutError(f"{err}; snapshot offsets {done.offsets}, ends {ends}\n"
                               + "\n".join(s.log_tail(15) for s in services)) from None
        end = time.perf_counter()
        machine_busy = busy_seconds() - at_first[0][0]
        bench_cpu, children_cpu = cpu_here(store_pids())
        bench_cpu, children_cpu = bench_cpu - at_first[0][1], children_cpu - at_first[0][2]
        load_after = os.getloadavg()[0]
        store_cpu = sum(cpu_seconds(s.proc.pid) - started[i][1] for i, s in enumerate(services))
        counters = [metric_sums(s.metrics_port, ("tuneloop_store_commit_conflicts_total",
                                                 "tuneloop_store_duplicate_events_total",
                                                 "tuneloop_store_dead_letters_total")) for s in services]
    wall_s = end - first

    # What the tables hold, checked through the read API.
    t0 = time.perf_counter()
    snapshot = read.current_snapshot(root, [feedback_topic])
    snapshot_read_s = time.perf_counter() - t0
    short = {p: (snapshot.offsets.get(feedback_topic, {}).get(p), end_) for p, end_ in ends.items()
             if snapshot.offsets.get(feedback_topic, {}).get(p, 0) < end_}
    if short:
        raise RuntimeError(f"read.current_snapshot disagrees with the poll: (snapshot, end) per partition {short}")
    pairs_table = tables.open_table(root, tables.PAIRS)
    row_ids = pairs_table.to_pyarrow_dataset().to_table(columns=["row_id"]).column("row_id")
    rows = len(row_ids)
    unique_rows = len(set(row_ids.to_pylist()))
    judgements = tables.open_table(root, tables.JUDGEMENTS).to_pyarrow_dataset().count_rows()
    if rows != events or unique_rows != rows or judgements != events:
        raise RuntimeError(f"{count} store(s) wrote {rows} rows ({unique_rows} distinct) and {judgements} "
                           f"judgements for {events} pairwise events")
    # The pairs table's commits that added rows, oldest first, and who wrote them.
    history = [h for h in read.history(root, tables.PAIRS) if h.get("operationMetrics", {}).get("num_added_rows")]
    history.sort(key=lambda h: h["version"])
    by_writer: dict[str, int] = {}
    for h in history:
        writer = h.get("writer", "?")
        by_writer[writer] = by_writer.get(writer, 0) + h["operationMetrics"]["num_added_rows"]
    span = (history[-1]["timestamp"] - history[0]["timestamp"]) / 1000 if len(history) > 1 else 0.0
    between = (rows - history[0]["operationMetrics"]["num_added_rows"]) / span if span > 0 else None
    store_cores = store_cpu / wall_s
    return {
        "stores": count, "rows": rows, "wall_s": round(wall_s, 2),
        "rows_per_s": round(rows / wall_s, 1),
        "rows_per_s_between_commits": None if between is None else round(between, 1),
        "pairs_commits_with_rows": len(history),
        "pairs_table_version": pairs_table.version(),
        "rows_per_store": sorted(by_writer.values(), reverse=True),
        "serving_skew_s": round(max(at for at, _ in started.values()) - first, 2),
        # From the last one SERVING: leaves out what the first did alone before the group settled.
        "rows_per_s_from_last_serving": round(rows / (end - max(at for at, _ in started.values())), 1),
        "store_cpu_s": round(store_cpu, 2),
        "store_cpu_s_per_1000_rows": round(store_cpu / rows * 1000, 3),
        "store_busy_cores": round(store_cores, 2),
        "machine_busy_cores": round(machine_busy / wall_s, 2),
        # Of the rest: this benchmark (its polls), its broker (0 with --bootstrap), and every
        # other process on the machine.
        "bench_busy_cores": round(bench_cpu / wall_s, 2),
        "broker_busy_cores": round(children_cpu / wall_s, 2),
        "foreign_busy_cores": round(max(0.0, machine_busy - store_cpu - bench_cpu - children_cpu) / wall_s, 2),
        "load_average_1m": [round(load_before, 2), round(load_after, 2)],
        "commit_conflicts": int(sum(c["tuneloop_store_commit_conflicts_total"] for c in counters)),
        "duplicates_skipped": int(sum(c["tuneloop_store_duplicate_events_total"] for c in counters)),
        "dead_letters": int(sum(c["tuneloop_store_dead_letters_total"] for c in counters)),
        "current_snapshot_s": round(snapshot_read_s, 3),
    }


def materialisation(bootstrap: str, work: Path, tag: str, args: argparse.Namespace) -> dict:
    settings = KafkaSettings(bootstrap_servers=bootstrap, partitions=args.partitions)
    feedback_topic, completions_topic, pairs = store_topics(settings, f"store.{tag}", args.store_events)
    fill_feedback(settings, feedback_topic, args.store_events, pairs)
    ends = end_offsets(settings, feedback_topic)
    topics = (feedback_topic, completions_topic)
    one = run_stores(1, bootstrap, work, f"one.{tag}", topics, ends, args.store_events, args)
    two = run_stores(2, bootstrap, work, f"two.{tag}", topics, ends, args.store_events, args)
    n = cpus()
    # At the one-store CPU cost per row, with the cores the rest of the machine left the stores
    # in the two-store run, two stores can reach at most this multiple of one store's rate.
    others = max(0.0, two["machine_busy_cores"] - two["store_busy_cores"])
    left = max(0.0, n - others)
    bound = min(2.0, left / one["store_busy_cores"]) if one["store_busy_cores"] > 0 else None
    # The same at the CPU cost per row the two stores paid: what the cores allowed them.
    bound_two_cost = min(2.0, left / (two["store_cpu_s_per_1000_rows"] / 1000 * one["rows_per_s"]))
    return {
        "events": args.store_events, "partitions": args.partitions, "completion_records": 2 * pairs,
        "cpus": n, "one": one, "two": two,
        "ratio_two_one": round(two["rows_per_s"] / one["rows_per_s"], 3),
        "ratio_two_one_between_commits": (
            round(two["rows_per_s_between_commits"] / one["rows_per_s_between_commits"], 3)
            if one["rows_per_s_between_commits"] and two["rows_per_s_between_commits"] else None),
        "cpu_per_row_two_one": round(two["store_cpu_s_per_1000_rows"] / one["store_cpu_s_per_1000_rows"], 3),
        "other_busy_cores_two": round(others, 2),
        "cpu_bound_ratio": None if bound is None else round(bound, 3),
        "cpu_bound_ratio_at_two_cost": round(bound_two_cost, 3),
    }


# --- 3. latency: submit -> visible in the store ---


class JudgementsWatcher(threading.Thread):
    """Polls the judgements table; notes when each event id is first seen committed. A poll
    reads the newest log entries (update_incremental) and, when the version moved, the event
    ids of the new commits only (the change data feed)."""

    def __init__(self, root: Path, poll_s: float) -> None:
        super().__init__(name="judgements-watcher", daemon=True)
        self.root, self.poll_s = root, poll_s
        self.seen_at: dict[str, float] = {}
        self.poll_costs: list[float] = []
        self.halt = threading.Event()
        self.error: BaseException | None = None
        table = tables.open_table(root, tables.JUDGEMENTS)
        if table is None:
            raise RuntimeError(f"no judgements table under {root}")
        self.table = table
        self.version = table.version()

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                start = time.perf_counter()
                self.table.update_incremental()
                version = self.table.version()
                if version > self.version:
                    ids = self.table.load_cdf(starting_version=self.version + 1, ending_version=version,
                                              columns=["event_id"]).read_all().column("event_id").to_pylist()
                    now = time.perf_counter()
                    for event_id in ids:
                        self.seen_at.setdefault(event_id, now)
                    self.version = version
                self.poll_costs.append(time.perf_counter() - start)
                self.halt.wait(self.poll_s)
        except BaseException as err:  # noqa: BLE001 - reported by the waiting side
            self.error = err


def latency(bootstrap: str, work: Path, tag: str, args: argparse.Namespace) -> dict:
    settings = KafkaSettings(bootstrap_servers=bootstrap, partitions=args.partitions)
    feedback_topic, completions_topic, pairs = store_topics(settings, f"latency.{tag}", args.latency_events)
    completion_ends = end_offsets(settings, completions_topic)
    events = [feedback_event(i % pairs, i // pairs, size=None) for i in range(args.latency_events)]

    root = work / "store-latency"
    env = store_env(bootstrap, root, f"latency.{tag}", feedback_topic, completions_topic, args.store_linger)
    with (
        ServiceProcess("store", [], env, work),
        ServiceProcess("feedback", [], feedback_env(bootstrap, feedback_topic), work) as service,
    ):
        def completions_in() -> bool:
            table = tables.open_table(root, tables.COMPLETIONS)
            if table is None:
                return False
            return all((tables.partition_version(table, completions_topic, p) or 0) >= end
                       for p, end in completion_ends.items())

        wait_for(completions_in, 120, "the store to take in the completions", interval_s=0.2)
        watcher = JudgementsWatcher(root, args.poll_ms / 1000)
        watcher.start()
        submitted: dict[str, float] = {}
        acked: list[float] = []
        interval = 1.0 / args.latency_rate
        with grpc.insecure_channel(service.target) as channel:
            stub = feedback_pb2_grpc.FeedbackStub(channel)
            grpc.channel_ready_future(channel).result(timeout=30)
            next_at = time.perf_counter()
            for event in events:
                next_at += interval
                start = time.perf_counter()
                submitted[event.event_id] = start
                if stub.Submit(event, timeout=30).status != ACCEPTED:
                    raise RuntimeError(f"event {event.event_id} not accepted")
                acked.append(time.perf_counter() - start)
                time.sleep(max(0.0, next_at - time.perf_counter()))

        def all_seen() -> bool:
            if watcher.error is not None:
                raise RuntimeError(f"the judgements watcher failed: {watcher.error!r}")
            return len(watcher.seen_at.keys() & submitted.keys()) == len(submitted)

        try:
            wait_for(all_seen, args.timeout_store_s, "every submitted event in the store")
        finally:
            watcher.halt.set()
            watcher.join(10)
    latencies_ms = [(watcher.seen_at[i] - t) * 1000 for i, t in submitted.items()]
    acked_ms = [s * 1000 for s in acked]
    linger = args.store_linger if args.store_linger is not None else StoreSettings().batch_linger_s
    return {
        "events": args.latency_events, "rate_per_s": args.latency_rate, "poll_ms": args.poll_ms,
        "store_batch_linger_s": linger,
        "p50_ms": round(percentile(latencies_ms, 50), 1),
        "p99_ms": round(percentile(latencies_ms, 99), 1),
        "max_ms": round(max(latencies_ms), 1),
        "mean_ms": round(statistics.fmean(latencies_ms), 1),
        "submit_ack_p50_ms": round(percentile(acked_ms, 50), 2),
        "submit_ack_p99_ms": round(percentile(acked_ms, 99), 2),
        "poll_cost_p50_ms": round(percentile([c * 1000 for c in watcher.poll_costs], 50), 2),
        "poll_cost_p99_ms": round(percentile([c * 1000 for c in watcher.poll_costs], 99), 2),
    }


# --- 4. snapshot read: a pairs table of --read-rows rows ---


def vocabulary(rng: random.Random, size: int = 4000) -> list[str]:
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    weights = [12, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1]
    return ["".join(rng.choices(letters, weights, k=rng.randint(2, 10))) for _ in range(size)]


def pair_rows(rng: random.Random, words: list[str], start: int, count: int, partitions: int) -> pa.Table:
    """`count` training rows as the store writes them for pairwise judgements of chat prompts:
    a system and a user message, two answers of a few hundred words, their ids and models."""
    created = datetime(2025, 1, 1, tzinfo=UTC)
    rows = []
    for n in range(start, start + count):
        event_id = f"{rng.getrandbits(128):032x}"
        pair = n // 2
        a, b = completion_ids(pair)
        question = " ".join(rng.choices(words, k=rng.randint(15, 60))) + "?"
        chosen = " ".join(rng.choices(words, k=rng.randint(60, 200))) + "."
        rejected = " ".join(rng.choices(words, k=rng.randint(60, 200))) + "."
        system = "You are a helpful assistant. Answer briefly and cite your sources."
        tie = n % 17 == 0
        rows.append({
            "row_id": f"{event_id}#0", "event_id": event_id, "source_event_ids": [event_id],
            "item_id": f"{a}|{b}", "tenant": "bench", "project": "bench", "source": "annotator",
            "annotator_id": f"annotator-{n % 40:03d}", "kind": "pairwise", "rule": "pairwise",
            "label": "tie" if tie else "preference",
            "prompt": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "prompt_raw": None,
            "rendered_prompt": f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
                               "<|im_start|>assistant\n",
            "chosen": chosen, "rejected": rejected, "chosen_id": a, "rejected_id": b,
            "chosen_model": "policy@v0001", "rejected_model": "policy@v0002" if n % 3 else "policy@v0001",
            "criteria": ["helpfulness", "harmlessness"] if n % 5 == 0 else [],
            "weight": 1.0, "calibration": n % 50 == 0, "anchor": n % 100 == 0,
            "created_at": created + timedelta(seconds=n),
            "topic": "bench.read.feedback", "partition": n % partitions, "offset": n // partitions,
        })
    return pa.Table.from_pylist(rows, schema=tables.PAIRS_SCHEMA)


def timed(fn: Callable[[], object], runs: int) -> tuple[float, float, object]:
    """(median seconds, first run's seconds, the last result) over `runs` calls."""
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times[0], result


def duckdb_source(root: Path) -> tuple[object, str, str]:
    """A DuckDB connection with the table readable as `pairs`: through the delta extension
    when it is installed (never downloaded here: offline it only costs a failed fetch), else
    over the table's Arrow dataset."""
    import duckdb

    con = duckdb.connect()
    installed = con.sql("SELECT installed FROM duckdb_extensions() WHERE extension_name = 'delta'").fetchall()
    if installed and installed[0][0]:
        try:
            con.sql("LOAD delta")
            con.sql(f"CREATE VIEW pairs AS SELECT * FROM delta_scan('{tables.table_uri(root, tables.PAIRS)}')")
            return con, "delta_scan", duckdb.__version__
        except duckdb.Error:
            pass
    dataset = tables.open_table(root, tables.PAIRS).to_pyarrow_dataset()
    con.register("pairs", dataset)
    return con, "arrow_dataset (delta extension not installed)", duckdb.__version__


def snapshot_read(work: Path, args: argparse.Namespace) -> dict:
    root = work / "store-read"
    rng = random.Random(20250101)
    words = vocabulary(rng)
    per_commit = -(-args.read_rows // args.read_commits)
    build_start = time.perf_counter()
    table = tables.ensure_tables(root)[tables.PAIRS]
    written = 0
    while written < args.read_rows:
        count = min(per_commit, args.read_rows - written)
        rows = pair_rows(rng, words, written, count, args.partitions)
        written += count
        versions = {("bench.read.feedback", p): -(-(written - p) // args.partitions) for p in range(args.partitions)}
        tables.append(table, rows, versions)
        table.update_incremental()
    build_s = time.perf_counter() - build_start
    version = table.version()
    files = [Path(f) for f in table.file_uris()]
    size_mb = sum(f.stat().st_size for f in files) / 1e6

    load_s, load_first_s, frame = timed(lambda: read.load_rows(root, version), args.read_runs)
    if len(frame) != args.read_rows:
        raise RuntimeError(f"load_rows read {len(frame)} rows of {args.read_rows}")
    del frame
    arrow_s, _, _ = timed(lambda: tables.open_table(root, tables.PAIRS, version).to_pyarrow_dataset().to_table(),
                          args.read_runs)
    snapshot_s, _, _ = timed(lambda: read.current_snapshot(root, ["bench.read.feedback"]), 1)

    result = {
        "rows": args.read_rows, "commits": args.read_commits, "version": version, "files": len(files),
        "table_mb": round(size_mb, 1), "build_s": round(build_s, 2), "runs": args.read_runs,
        "load_rows_s": round(load_s, 3), "load_rows_first_s": round(load_first_s, 3),
        "pyarrow_to_table_s": round(arrow_s, 3),
        "current_snapshot_s": round(snapshot_s, 3),
    }
    try:
        con, via, duckdb_version = duckdb_source(root)
    except ImportError:  # duckdb comes with the test extra
        return {**result, "duckdb_via": "duckdb not installed"}
    count_s, _, counted = timed(lambda: con.sql("SELECT count(*) FROM pairs").fetchall()[0][0], args.read_runs)
    if counted != args.read_rows:
        raise RuntimeError(f"DuckDB counted {counted} rows of {args.read_rows}")
    to_arrow = "to_arrow_table" if hasattr(con.sql("SELECT 1"), "to_arrow_table") else "fetch_arrow_table"
    duck_arrow_s, _, _ = timed(lambda: getattr(con.sql("SELECT * FROM pairs"), to_arrow)(), args.read_runs)
    duck_pandas_s, _, _ = timed(lambda: con.sql("SELECT * FROM pairs").df(), args.read_runs)
    query = ("SELECT annotator_id, label, count(*) AS n, avg(length(chosen)) AS chosen_chars "
             "FROM pairs GROUP BY ALL ORDER BY ALL")
    duck_query_s, _, _ = timed(lambda: con.sql(query).fetchall(), args.read_runs)
    con.close()
    return {
        **result,
        "duckdb_via": via, "duckdb_version": duckdb_version,
        "duckdb_count_s": round(count_s, 4),
        "duckdb_select_all_arrow_s": round(duck_arrow_s, 3),
        "duckdb_select_all_pandas_s": round(duck_pandas_s, 3),
        "duckdb_group_by_s": round(duck_query_s, 3),
        "ratio_load_rows_duckdb_pandas": round(load_s / duck_pandas_s, 3),
    }


# --- main ---


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000, help="events ingested (and Java records sent)")
    parser.add_argument("--batch", type=int, default=500, help="events per SubmitBatch or SubmitStream call")
    parser.add_argument("--streams", type=int, default=2, help="calls in flight")
    parser.add_argument("--store-events", type=int, default=10_000, help="pre-filled events the stores materialise")
    parser.add_argument("--partitions", type=int, default=4, help="partitions of the store's topics")
    parser.add_argument("--store-poll-ms", type=float, default=100.0,
                        help="how often the pairs table's snapshot offsets are polled in the materialisation runs")
    parser.add_argument("--latency-events", type=int, default=300, help="events timed from submit to the store")
    parser.add_argument("--latency-rate", type=float, default=20.0, help="events per second in the latency run")
    parser.add_argument("--poll-ms", type=float, default=10.0, help="how often the judgements table is polled")
    parser.add_argument("--store-linger", type=float, default=None,
                        help="the store's batch_linger_s (default: the store's own default)")
    parser.add_argument("--read-rows", type=int, default=100_000, help="rows of the pairs table read in part 4")
    parser.add_argument("--read-commits", type=int, default=20, help="commits that write them")
    parser.add_argument("--read-runs", type=int, default=3, help="reads timed per reader (the median is reported)")
    parser.add_argument("--timeout-store-s", type=float, default=600.0, help="longest wait for the store")
    parser.add_argument("--skip", nargs="*", default=[], choices=["ingestion", "store", "latency", "read"])
    parser.add_argument("--bootstrap", help="use this Kafka broker instead of starting one")
    parser.add_argument("--work", type=Path, help="keep the services' logs and the tables in this folder")
    parser.add_argument("--store-log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="the store processes' log level (their logs: --work)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    return parser.parse_args()


def ratios(result: dict) -> Iterator[dict]:
    ingest, store, lat, snap = (result.get(k) for k in ("ingestion", "store", "latency", "read"))
    if ingest:
        yield {"name": "Feedback service (SubmitBatch)/Java producer throughput (acks=all)", "value": ingest["ratio"],
               "numerator": f"{ingest['service_events_per_s']:,.0f} ev/s",
               "denominator": f"{ingest['java_records_per_s']:,.0f} rec/s"}
        yield {"name": "Feedback service (SubmitStream)/Java producer throughput (acks=all)",
               "value": ingest["stream_ratio"], "numerator": f"{ingest['stream_events_per_s']:,.0f} ev/s",
               "denominator": f"{ingest['java_records_per_s']:,.0f} rec/s"}
    if ingest and store:
        yield {"name": "store materialisation (one store)/Feedback ingestion rate",
               "value": round(store["one"]["rows_per_s"] / ingest["service_events_per_s"], 3),
               "numerator": f"{store['one']['rows_per_s']:,.0f} rows/s",
               "denominator": f"{ingest['service_events_per_s']:,.0f} ev/s"}
    if store:
        one, two = store["one"], store["two"]
        yield {"name": "store materialisation two stores/one store (same group)", "value": store["ratio_two_one"],
               "numerator": f"{two['rows_per_s']:,.0f} rows/s, {two['store_cpu_s_per_1000_rows']:.2f} CPU-s/1000 rows",
               "denominator": (f"{one['rows_per_s']:,.0f} rows/s, "
                               f"{one['store_cpu_s_per_1000_rows']:.2f} CPU-s/1000 rows")}
        if store["cpu_bound_ratio"] is not None:
            yield {"name": "two/one ceiling the cores allowed, at one store's CPU per row",
                   "value": store["cpu_bound_ratio"],
                   "numerator": f"{store['cpus']} cores - {store['other_busy_cores_two']:.2f} busy elsewhere",
                   "denominator": f"one store's {one['store_busy_cores']:.2f} busy cores"}
        yield {"name": "two/one ceiling the cores allowed, at two stores' CPU per row",
               "value": store["cpu_bound_ratio_at_two_cost"],
               "numerator": f"{store['cpus']} cores - {store['other_busy_cores_two']:.2f} busy elsewhere",
               "denominator": (f"{two['store_cpu_s_per_1000_rows']:.2f} CPU-s/1000 rows x "
                               f"{one['rows_per_s']:,.0f} rows/s")}
    if lat:
        yield {"name": "event-to-store latency p99/p50", "value": round(lat["p99_ms"] / lat["p50_ms"], 3),
               "numerator": f"p99 {lat['p99_ms']:,.0f} ms", "denominator": f"p50 {lat['p50_ms']:,.0f} ms"}
    if snap and "ratio_load_rows_duckdb_pandas" in snap:
        yield {"name": f"{snap['rows'] // 1000}k-pair snapshot read: read.load_rows/DuckDB (to pandas, time)",
               "value": snap["ratio_load_rows_duckdb_pandas"],
               "numerator": f"{snap['load_rows_s'] * 1000:,.0f} ms",
               "denominator": f"{snap['duckdb_select_all_pandas_s'] * 1000:,.0f} ms ({snap['duckdb_via']})"}


def print_store(s: dict) -> None:
    for key in ("one", "two"):
        r = s[key]
        between = r["rows_per_s_between_commits"]
        print(f"store x{r['stores']}: {r['rows']} rows from {s['events']} events + {s['completion_records']} "
              f"completions ({s['partitions']} partitions each) in {r['wall_s']:.1f} s, "
              f"{r['pairs_commits_with_rows']} pairs commits: {r['rows_per_s']:,.0f} rows/s (between first and "
              f"last commit with rows: {'-' if between is None else f'{between:,.0f}'} rows/s"
              + (f"; from the last SERVING, {r['serving_skew_s']:.1f} s later: {r['rows_per_s_from_last_serving']:,.0f}"
                 if r["stores"] > 1 else "") + f"); rows per store "
              f"{r['rows_per_store']}; CPU {r['store_cpu_s']:.1f} s = {r['store_cpu_s_per_1000_rows']:.2f} "
              f"CPU-s/1000 rows, stores {r['store_busy_cores']:.2f} cores busy, machine "
              f"{r['machine_busy_cores']:.2f} of {s['cpus']} (broker {r['broker_busy_cores']:.2f}, this benchmark "
              f"{r['bench_busy_cores']:.2f}, other processes {r['foreign_busy_cores']:.2f}; load average "
              f"{r['load_average_1m'][0]:g} -> {r['load_average_1m'][1]:g}); conflicts {r['commit_conflicts']}, "
              f"duplicates skipped {r['duplicates_skipped']}", flush=True)
    print(f"store scaling two/one: {s['ratio_two_one']:.2f} (goal >= 1.7; between first and last commit "
          f"{s['ratio_two_one_between_commits']}); CPU per row two/one {s['cpu_per_row_two_one']:.2f}; with "
          f"{s['cpus']} cores and {s['other_busy_cores_two']:.2f} busy elsewhere the cores allowed two/one "
          f"{s['cpu_bound_ratio']} at one store's CPU per row, {s['cpu_bound_ratio_at_two_cost']} at the two "
          f"stores'", flush=True)


def main() -> None:
    global STORE_LOG_LEVEL
    args = parse_args()
    STORE_LOG_LEVEL = args.store_log_level
    home = install()
    tag = uuid.uuid4().hex[:8]
    result: dict = {"benchmark": "store", "cpus": cpus()}
    with ExitStack() as stack:
        if args.work is not None:
            args.work.mkdir(parents=True, exist_ok=True)
            work = args.work.resolve()
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-store-")))
        bootstrap = stack.enter_context(broker_at(args.bootstrap, home))
        if "ingestion" not in args.skip:
            result["ingestion"] = ingestion(bootstrap, home, work, tag, args)
            i = result["ingestion"]
            print(f"ingestion, {i['events']} x {RECORD_BYTES} B, acks=all, {i['batch']} events per call, "
                  f"{i['streams']} calls in flight: Feedback service SubmitBatch {i['service_events_per_s']:,.0f} "
                  f"ev/s, SubmitStream {i['stream_events_per_s']:,.0f} ev/s; Java ProducerPerformance "
                  f"{i['java_records_per_s']:,.0f} rec/s", flush=True)
        if "store" not in args.skip:
            result["store"] = materialisation(bootstrap, work, tag, args)
            print_store(result["store"])
        if "latency" not in args.skip:
            result["latency"] = latency(bootstrap, work, tag, args)
            lat = result["latency"]
            print(f"event-to-store latency, {lat['events']} events at {lat['rate_per_s']:g}/s, store linger "
                  f"{lat['store_batch_linger_s']:g} s: p50 {lat['p50_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms, "
                  f"max {lat['max_ms']:.0f} ms (Submit acknowledged: p50 {lat['submit_ack_p50_ms']:.1f} ms, "
                  f"p99 {lat['submit_ack_p99_ms']:.1f} ms; judgements poll p50 {lat['poll_cost_p50_ms']:.1f} ms)",
                  flush=True)
        if "read" not in args.skip:
            result["read"] = snapshot_read(work, args)
            r = result["read"]
            duck = (f"DuckDB {r['duckdb_version']} via {r['duckdb_via']}: SELECT * to pandas "
                    f"{r['duckdb_select_all_pandas_s'] * 1000:,.0f} ms, to Arrow "
                    f"{r['duckdb_select_all_arrow_s'] * 1000:,.0f} ms, count(*) {r['duckdb_count_s'] * 1000:,.1f} ms, "
                    f"GROUP BY {r['duckdb_group_by_s'] * 1000:,.0f} ms"
                    if "duckdb_version" in r else r["duckdb_via"])
            print(f"snapshot read, {r['rows']:,} pairs in {r['commits']} commits ({r['files']} files, "
                  f"{r['table_mb']:.0f} MB), median of {r['runs']}: read.load_rows {r['load_rows_s'] * 1000:,.0f} ms "
                  f"(first {r['load_rows_first_s'] * 1000:,.0f} ms; pyarrow scan alone "
                  f"{r['pyarrow_to_table_s'] * 1000:,.0f} ms); {duck}; read.current_snapshot "
                  f"{r['current_snapshot_s'] * 1000:,.0f} ms", flush=True)
    result["ratios"] = list(ratios(result))
    for ratio in result["ratios"]:
        print(f"ratio {ratio['name']}: {ratio['value']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
