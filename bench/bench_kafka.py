"""Producer throughput: kafka-python (as tuneloop configures it) against Kafka's own Java producer.

Both send the same number of 1 KiB records with acks=all and idempotence on, the same
linger.ms and batch.size, no keys and no compression, to fresh 3-partition topics on one local broker, one
after the other in one run. Prints records/s and MB/s for each and the Python/Java ratio,
then the results as one JSON object on the last line (and in PATH with --json).

    .venv/bin/python bench/bench_kafka.py [--records 50000] [--bootstrap HOST:PORT] [--json PATH]

Without --bootstrap it starts a broker of its own in a temporary directory (jars from
`tuneloop kafka install`) and stops it at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from kafka import __version__ as kafka_python_version
from tuneloop.common.local_kafka import LocalBroker, install, java_executable
from tuneloop.common.kafka import KafkaSettings, ensure_topics, make_producer

RECORD_BYTES = 1024


def python_producer(settings: KafkaSettings, topic: str, records: int) -> float:
    """Seconds from the first send until every record is acknowledged."""
    producer = make_producer(settings)
    payload = os.urandom(RECORD_BYTES)
    producer.send(topic, value=payload).get(timeout=30)  # connection and producer id first
    start = time.perf_counter()
    for _ in range(records):
        producer.send(topic, value=payload)
    producer.flush()
    elapsed = time.perf_counter() - start
    producer.close()
    return elapsed


def java_producer(home: Path, settings: KafkaSettings, topic: str, records: int) -> float:
    """Records/s as org.apache.kafka.tools.ProducerPerformance reports it."""
    cmd = [
        java_executable(), "-Xmx512m", f"-Dlog4j2.configurationFile={home / 'log4j2.properties'}",
        "-cp", str(home / "libs" / "*"), "org.apache.kafka.tools.ProducerPerformance",
        "--topic", topic, "--num-records", str(records), "--record-size", str(RECORD_BYTES),
        "--throughput", "-1", "--producer-props",
        f"bootstrap.servers={settings.bootstrap_servers}", "acks=all", "enable.idempotence=true",
        f"linger.ms={settings.linger_ms}", "max.in.flight.requests.per.connection=5", f"batch.size={settings.batch_size}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    # The summary line: "N records sent, X records/sec (Y MB/sec), ..."
    summary = re.findall(rf"^{records} records sent, ([\d.]+) records/sec", out, re.MULTILINE)
    if not summary:
        raise RuntimeError(f"no summary in ProducerPerformance output:\n{out[-2000:]}")
    return float(summary[-1])


@contextlib.contextmanager
def broker_at(bootstrap: str | None, home: Path) -> Iterator[str]:
    if bootstrap:
        yield bootstrap
        return
    with tempfile.TemporaryDirectory(prefix="bench-kafka-") as tmp, LocalBroker(Path(tmp), home=home) as broker:
        yield broker.bootstrap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    home = install()
    with broker_at(args.bootstrap, home) as bootstrap:
        settings = KafkaSettings(bootstrap_servers=bootstrap)
        run = uuid.uuid4().hex[:8]
        py_topic, java_topic, warm_topic = (f"bench.{name}.{run}" for name in ("python", "java", "warmup"))
        ensure_topics(settings, [py_topic, java_topic, warm_topic])
        python_producer(settings, warm_topic, 2_000)  # the broker's first appends are slower
        py_rate = args.records / python_producer(settings, py_topic, args.records)
        java_rate = java_producer(home, settings, java_topic, args.records)
    mb = RECORD_BYTES / 1e6
    print(f"records: {args.records} x {RECORD_BYTES} B, acks=all, idempotent, linger.ms={settings.linger_ms}")
    print(f"kafka-python {kafka_python_version}: {py_rate:10.0f} records/s {py_rate * mb:7.1f} MB/s")
    print(f"Java ProducerPerformance:  {java_rate:10.0f} records/s {java_rate * mb:7.1f} MB/s")
    print(f"ratio python/java: {py_rate / java_rate:.3f}")
    result = {
        "benchmark": "kafka",
        "setup": {"records": args.records, "record_bytes": RECORD_BYTES, "acks": "all", "idempotent": True,
                  "linger_ms": settings.linger_ms, "kafka_python": kafka_python_version},
        "python_records_per_s": round(py_rate, 1),
        "java_records_per_s": round(java_rate, 1),
        "python_mb_per_s": round(py_rate * mb, 2),
        "java_mb_per_s": round(java_rate * mb, 2),
        "ratios": [{"name": "kafka-python/Java producer throughput", "value": round(py_rate / java_rate, 3),
                    "numerator": f"{py_rate:,.0f} rec/s", "denominator": f"{java_rate:,.0f} rec/s"}],
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
