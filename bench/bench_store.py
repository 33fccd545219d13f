"""Feedback ingestion and the preference store: durable ingestion through the Feedback service
against Kafka's own Java producer, the store's materialisation rate, and event-to-store latency.

1. Ingestion. A `tuneloop serve feedback` process; the benchmark streams pairwise events of
   exactly 1 KiB (serialized, as stored) to it with SubmitStream, `--batch` events per call
   and `--streams` calls in flight. A call answers once the broker acknowledged every event
   (idempotent producer, acks=all). Then `org.apache.kafka.tools.ProducerPerformance` sends the
   same number of records of the same size with the same producer settings (acks=all,
   idempotence, linger.ms) to a fresh topic on the same broker. The ratio service/Java is
   the share of the broker's capacity one Feedback process delivers durably, validation,
   deduplication and gRPC included (target: at least 0.25).
2. Materialisation. A feedback topic and a completions topic filled beforehand (`--store-events`
   pairwise events, each item judged by two annotators); a `tuneloop serve store` process on a
   fresh root consumes them. Rows/s is rows over the time from the store reporting SERVING
   (its consumer starts just before) until its snapshot reaches the end of the feedback topic;
   the rate between its first and last commit with rows is reported beside it.
3. Latency. Feedback service and store running, the completions already in the store; events
   submitted one per Submit call at `--latency-rate` per second. Latency is from just before
   the Submit call to the moment a reader of the store's index sees the event committed (the
   index polled every `--poll-ms`), p50 and p99. The store runs with its default batching
   (`batch_linger_s`), which dominates this latency; `--store-linger` changes it.

    .venv/bin/python bench/bench_store.py [--events 20000] [--store-events 10000]
        [--latency-events 300] [--bootstrap HOST:PORT] [--json PATH]

The defaults are sized to finish in a few minutes on 2 cores; for a figure worth quoting use
e.g. --events 50000 --store-events 50000. Prints a summary and the ratios, then the results as
one JSON object on the last line (and in PATH with --json). Without --bootstrap it starts a
broker of its own and stops it at the end.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import grpc
import pyarrow.parquet as pq

from bench_kafka import RECORD_BYTES, broker_at, java_producer
from tuneloop.common.broker import install
from tuneloop.common.kafka import KafkaSettings, end_offsets, ensure_topics, make_producer
from tuneloop.common.processes import ServiceProcess
from tuneloop.feedback.snapshot import INDEX_FILE, ROWS_DIR, current_snapshot
from tuneloop.feedback.store import StoreSettings
from tuneloop.feedback.validation import default_item_id
from tuneloop.v1 import completion_pb2, feedback_pb2, feedback_pb2_grpc

ACCEPTED = feedback_pb2.SUBMIT_STATUS_ACCEPTED
CHOICES = (feedback_pb2.PAIRWISE_CHOICE_A, feedback_pb2.PAIRWISE_CHOICE_B)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


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
    env = {
        "TUNELOOP_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "TUNELOOP_STORE_ROOT": str(root),
        "TUNELOOP_STORE_FEEDBACK_TOPIC": feedback_topic,
        "TUNELOOP_STORE_COMPLETIONS_TOPIC": completions_topic,
        "TUNELOOP_STORE_DLQ_TOPIC": f"bench.store.dlq.{tag}",
        "TUNELOOP_STORE_GROUP_ID": f"bench-store-{tag}",
        "TUNELOOP_STORE_LOG_LEVEL": "WARNING",
    }
    if linger_s is not None:
        env["TUNELOOP_STORE_BATCH_LINGER_S"] = str(linger_s)
    return env


def read_index(root: Path) -> sqlite3.Connection:
    """A reader of the store's index (WAL: it never blocks the store's commits)."""
    conn = sqlite3.connect(root / INDEX_FILE, isolation_level=None, timeout=30.0)
    conn.execute("PRAGMA query_only=1")
    return conn


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def caught_up(root: Path, ends: dict[int, int]) -> bool:
    if not (root / INDEX_FILE).is_file():
        return False
    done = current_snapshot(root)
    return all(done.get(p, 0) >= end for p, end in ends.items())


# --- 1. ingestion: Feedback service vs Java ProducerPerformance ---


def stream_all(target: str, events: list[feedback_pb2.FeedbackEvent], batch: int, streams: int) -> float:
    """Seconds to have every event acknowledged ACCEPTED, in SubmitStream calls of `batch`
    events with `streams` calls in flight."""
    calls = [events[i : i + batch] for i in range(0, len(events), batch)]
    with grpc.insecure_channel(target) as channel:
        stub = feedback_pb2_grpc.FeedbackStub(channel)

        def send(call: list[feedback_pb2.FeedbackEvent]) -> int:
            results = stub.SubmitStream(iter(call), timeout=120).results
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
    events = [feedback_event(len(warmup) + i // 2, i % 2) for i in range(args.events)]
    with ServiceProcess("feedback", [], feedback_env(bootstrap, topic), work) as service:
        # Connections, the producer id and the broker's first appends, not measured.
        stream_all(service.target, warmup, args.batch, 1)
        service_s = stream_all(service.target, events, args.batch, args.streams)
    service_rate = args.events / service_s
    java_rate = java_producer(home, settings, java_topic, args.events)
    return {
        "events": args.events, "record_bytes": RECORD_BYTES, "batch": args.batch, "streams": args.streams,
        "service_events_per_s": round(service_rate, 1),
        "java_records_per_s": round(java_rate, 1),
        "service_mb_per_s": round(service_rate * RECORD_BYTES / 1e6, 2),
        "java_mb_per_s": round(java_rate * RECORD_BYTES / 1e6, 2),
        "ratio": round(service_rate / java_rate, 3),
    }


# --- 2. materialisation: the store consuming a pre-filled topic ---


def commit_timeline(root: Path) -> list[tuple[float, int]]:
    """(committed_at, training rows written) per commit that wrote files, in order."""
    with closing(read_index(root)) as conn:
        commits = conn.execute("SELECT committed_at, files FROM commits ORDER BY seq").fetchall()
    out = []
    for committed_at, files in commits:
        rows = sum(pq.read_metadata(root / f).num_rows for f in json.loads(files) if f.startswith(ROWS_DIR + "/"))
        out.append((committed_at, rows))
    return out


def store_topics(bootstrap: str, name: str, events: int) -> tuple[KafkaSettings, str, str, int]:
    """Fresh feedback and completions topics, the completions for `events` judgements already in
    (two judgements per pair): (settings, feedback topic, completions topic, pairs)."""
    settings = KafkaSettings(bootstrap_servers=bootstrap)
    feedback_topic, completions_topic = f"bench.{name}.feedback", f"bench.{name}.completions"
    ensure_topics(settings, [feedback_topic, completions_topic])
    pairs = max(1, events // 2)
    fill_completions(settings, completions_topic, pairs)
    return settings, feedback_topic, completions_topic, pairs


def materialisation(bootstrap: str, work: Path, tag: str, args: argparse.Namespace) -> dict:
    settings, feedback_topic, completions_topic, pairs = store_topics(bootstrap, f"store.{tag}", args.store_events)
    producer = make_producer(settings)
    for i in range(args.store_events):
        event = feedback_event(i % pairs, i // pairs, size=None)
        producer.send(feedback_topic, key=event.item_id.encode(), value=event.SerializeToString())
    producer.flush()
    producer.close()
    ends = end_offsets(settings, feedback_topic)

    root = work / "store-materialise"
    env = store_env(bootstrap, root, f"m{tag}", feedback_topic, completions_topic, args.store_linger)
    with ServiceProcess("store", [], env, work) as store:
        ready = time.perf_counter()
        wait_for(lambda: caught_up(root, ends), args.timeout_store_s, f"the store to consume {args.store_events} events")
        wall_s = time.perf_counter() - ready
        assert store.proc is not None and store.proc.poll() is None
    timeline = commit_timeline(root)
    rows = sum(n for _, n in timeline)
    if rows != args.store_events:
        raise RuntimeError(f"the store wrote {rows} rows for {args.store_events} pairwise events")
    # Beside it, the rate between the first and the last commit that wrote rows (the first
    # one's rows left out): it leaves out the batches that only took in completions, so it
    # is the higher figure, the pace of joining once the completions are in.
    span = timeline[-1][0] - timeline[0][0]
    between = (rows - timeline[0][1]) / span if len(timeline) > 1 and span > 0 else None
    return {
        "events": args.store_events, "completion_records": 2 * pairs, "rows": rows, "commits": len(timeline),
        "rows_per_s": round(rows / wall_s, 1),
        "records_per_s": round((args.store_events + 2 * pairs) / wall_s, 1),
        "rows_per_s_between_commits": None if between is None else round(between, 1),
        "wall_s": round(wall_s, 2),
    }


# --- 3. latency: submit -> visible in the store ---


class IndexWatcher(threading.Thread):
    """Polls the store's index; notes when each event id is first seen committed."""

    def __init__(self, root: Path, poll_s: float) -> None:
        super().__init__(name="index-watcher", daemon=True)
        self.root, self.poll_s = root, poll_s
        self.seen_at: dict[str, float] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        last_seq = 0
        with closing(read_index(self.root)) as conn:
            while not self.halt.is_set():
                rows = conn.execute(
                    "SELECT event_id, commit_seq FROM seen_events WHERE commit_seq > ?", (last_seq,)
                ).fetchall()
                now = time.perf_counter()
                for event_id, seq in rows:
                    self.seen_at.setdefault(event_id, now)
                    last_seq = max(last_seq, seq)
                self.halt.wait(self.poll_s)


def latency(bootstrap: str, work: Path, tag: str, args: argparse.Namespace) -> dict:
    settings, feedback_topic, completions_topic, pairs = store_topics(bootstrap, f"latency.{tag}", args.latency_events)
    completion_ends = end_offsets(settings, completions_topic)
    events = [feedback_event(i % pairs, i // pairs, size=None) for i in range(args.latency_events)]

    root = work / "store-latency"
    env = store_env(bootstrap, root, f"l{tag}", feedback_topic, completions_topic, args.store_linger)
    with (
        ServiceProcess("store", [], env, work),
        ServiceProcess("feedback", [], feedback_env(bootstrap, feedback_topic), work) as service,
    ):
        def completions_in() -> bool:
            if not (root / INDEX_FILE).is_file():
                return False
            with closing(read_index(root)) as conn:
                got = dict(conn.execute("SELECT partition, next_offset FROM positions WHERE topic = ?",
                                        (completions_topic,)).fetchall())
            return all(got.get(p, 0) >= end for p, end in completion_ends.items())

        wait_for(completions_in, 120, "the store to take in the completions")
        watcher = IndexWatcher(root, args.poll_ms / 1000)
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
        try:
            wait_for(lambda: len(watcher.seen_at.keys() & submitted.keys()) == len(submitted), args.timeout_store_s,
                     "every submitted event in the store")
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
    }


# --- main ---


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000, help="events ingested (and Java records sent)")
    parser.add_argument("--batch", type=int, default=500, help="events per SubmitStream call")
    parser.add_argument("--streams", type=int, default=2, help="SubmitStream calls in flight")
    parser.add_argument("--store-events", type=int, default=10_000, help="pre-filled events the store materialises")
    parser.add_argument("--latency-events", type=int, default=300, help="events timed from submit to the store")
    parser.add_argument("--latency-rate", type=float, default=20.0, help="events per second in the latency run")
    parser.add_argument("--poll-ms", type=float, default=10.0, help="how often the store's index is polled")
    parser.add_argument("--store-linger", type=float, default=None,
                        help="the store's batch_linger_s (default: the store's own default)")
    parser.add_argument("--timeout-store-s", type=float, default=600.0, help="longest wait for the store")
    parser.add_argument("--skip", nargs="*", default=[], choices=["ingestion", "store", "latency"])
    parser.add_argument("--bootstrap", help="use this Kafka broker instead of starting one")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    return parser.parse_args()


def ratios(result: dict) -> Iterator[dict]:
    ingest, store, lat = result.get("ingestion"), result.get("store"), result.get("latency")
    if ingest:
        yield {"name": "Feedback service/Java producer throughput (acks=all)", "value": ingest["ratio"],
               "numerator": f"{ingest['service_events_per_s']:,.0f} ev/s",
               "denominator": f"{ingest['java_records_per_s']:,.0f} rec/s"}
    if ingest and store:
        yield {"name": "store materialisation/Feedback ingestion rate",
               "value": round(store["rows_per_s"] / ingest["service_events_per_s"], 3),
               "numerator": f"{store['rows_per_s']:,.0f} rows/s",
               "denominator": f"{ingest['service_events_per_s']:,.0f} ev/s"}
    if lat:
        yield {"name": "event-to-store latency p99/p50", "value": round(lat["p99_ms"] / lat["p50_ms"], 3),
               "numerator": f"p99 {lat['p99_ms']:,.0f} ms", "denominator": f"p50 {lat['p50_ms']:,.0f} ms"}


def main() -> None:
    args = parse_args()
    home = install()
    tag = uuid.uuid4().hex[:8]
    result: dict = {"benchmark": "store"}
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp, broker_at(args.bootstrap, home) as bootstrap:
        work = Path(tmp)
        if "ingestion" not in args.skip:
            result["ingestion"] = ingestion(bootstrap, home, work, tag, args)
            i = result["ingestion"]
            print(f"ingestion, {i['events']} x {RECORD_BYTES} B, acks=all: Feedback service (SubmitStream, "
                  f"{i['batch']} per call, {i['streams']} in flight) {i['service_events_per_s']:,.0f} ev/s, "
                  f"Java ProducerPerformance {i['java_records_per_s']:,.0f} rec/s", flush=True)
        if "store" not in args.skip:
            result["store"] = materialisation(bootstrap, work, tag, args)
            s = result["store"]
            between = s["rows_per_s_between_commits"]
            print(f"store: {s['rows']} rows from {s['events']} events + {s['completion_records']} completions in "
                  f"{s['wall_s']:.1f} s, {s['commits']} commits: {s['rows_per_s']:,.0f} rows/s "
                  f"({s['records_per_s']:,.0f} records/s; between first and last commit with rows: "
                  f"{'-' if between is None else f'{between:,.0f}'} rows/s)", flush=True)
        if "latency" not in args.skip:
            result["latency"] = latency(bootstrap, work, tag, args)
            lat = result["latency"]
            print(f"event-to-store latency, {lat['events']} events at {lat['rate_per_s']:g}/s, store linger "
                  f"{lat['store_batch_linger_s']:g} s: p50 {lat['p50_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms, "
                  f"max {lat['max_ms']:.0f} ms (Submit acknowledged: p50 {lat['submit_ack_p50_ms']:.1f} ms, "
                  f"p99 {lat['submit_ack_p99_ms']:.1f} ms)", flush=True)
    result["ratios"] = list(ratios(result))
    for ratio in result["ratios"]:
        print(f"ratio {ratio['name']}: {ratio['value']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
