"""The database's disk fills up under load, in direct mode and in Kafka mode.

The embedded PostgreSQL's data folder is a small tmpfs (root only: CI runs as root), a
filler file takes the rest of it while a client posts spans with known ids, retrying
what is not answered 202 with the same ids, like the SDK.

What PostgreSQL does, as measured here (PostgreSQL 18):
- a table or index that cannot grow: the statement fails ("could not extend file ...:
  No space left on device", SQLSTATE 53100), the server stays up, and the next insert
  after space returns just works;
- WAL that needs a new segment file: PANIC, the server restarts itself, and its crash
  recovery cannot write either, so it shuts down for good ("shutting down due to startup
  process failure"). It starts again (supervisor's watchdog) only once there is space.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter

import pytest

from appliance.embedded import SERVICE_USER
from ingest.queues import Topic
from tests.kafka_broker import SESSION_TIMEOUT_MS, ConsumerProcess, TansuBroker, wait_for
from tests.workers.processes import SpanClient, Stack, Web, fill_disk, kill_group, mount_small_disk, new_data_dir, unmount

# Minutes of real outages: `make test-faults` (CI runs it after `make test`), not the default run.
pytestmark = [pytest.mark.e2e, pytest.mark.faults]
DISK_MB = 160  # the cluster takes ~45 MB after the migrations


@pytest.fixture
def small_disk(tmp_path):
    data_dir = new_data_dir("diskfull")
    mount_small_disk(data_dir / "postgres", megabytes=DISK_MB, owner=SERVICE_USER)
    stack = Stack(data_dir, tmp_path)
    cleanups: list = []  # how to end what the test started
    try:
        stack.start().prepare("diskfull")
        yield stack, cleanups
    finally:
        for cleanup in cleanups:
            cleanup()
        stack.close()
        unmount(data_dir / "postgres")
        shutil.rmtree(data_dir, ignore_errors=True)


def _fresh_wal_segment(stack: Stack) -> None:
    # The next WAL segment file is far away: a full disk then hits the tables first, as it mostly does.
    stack.query("CHECKPOINT")
    stack.query("SELECT pg_switch_wal()")


def _exactly_once(stack: Stack, client: SpanClient) -> None:
    stored = Counter(stack.stored_ids())
    rows, distinct, keys = stack.span_counts()
    assert set(client.tally.accepted) <= set(stored), "spans acknowledged with a 202 are missing"
    assert set(stored) <= client.tally.sent
    assert rows == distinct == keys == len(stored) and max(stored.values()) == 1


def test_direct_mode_full_disk_answers_503_loses_nothing_and_recovers(small_disk, tmp_path):
    stack, cleanups = small_disk
    web = Web(stack, tmp_path / "web.log")
    cleanups.append(web.kill)
    web.start()
    client = SpanClient([web.url], stack.key, pause=0.05, retry_pause=0.3)
    figures: dict[str, dict] = {}

    def web_alive() -> None:
        assert web.proc.poll() is None, f"web exited:\n{web.output()[-3000:]}"

    client.start()
    try:
        wait_for(lambda: stack.span_counts()[0] >= 300, 60, "the first spans stored", check=web_alive)

        # 1. Tables cannot grow: 503 with Retry-After, the server stays up, and space coming back is enough.
        _fresh_wal_segment(stack)
        postmaster = stack.pg_pid()
        failures = len(client.tally.failures)
        filler = fill_disk(stack.pgdata)
        full = time.monotonic()
        wait_for(lambda: len(client.tally.failures) - failures >= 5, 30, "answers other than 202 while full",
                 check=web_alive)
        stored_while_full = stack.span_counts()[0]
        time.sleep(2)
        assert stack.span_counts()[0] == stored_while_full, "spans were stored on a full disk?"
        filler.unlink()
        freed = time.monotonic()
        wait_for(lambda: client.tally.first_202_after(freed), 30, "a 202 once space is back", check=web_alive)
        assert stack.pg_pid() == postmaster, "PostgreSQL restarted"
        figures["tables full"] = {"full_s": freed - full, "failed_requests": len(client.tally.failures) - failures,
                                  "first_202_after_space_s": client.tally.first_202_after(freed) - freed}

        # 2. WAL cannot grow: PostgreSQL panics and stays down until it is started again with space.
        failures = len(client.tally.failures)
        filler = fill_disk(stack.pgdata)
        full = time.monotonic()
        errors: list[str] = []
        deadline = time.monotonic() + 60
        while stack.pg_running() and time.monotonic() < deadline:
            # Each switch takes a recycled segment file; once there are none, the next must be created.
            # A statement may also just fail on the full disk (or on a loaded machine, time out):
            # keep switching until the PANIC has stopped the server.
            try:
                stack.query("SELECT txid_current(), pg_switch_wal()")
            except Exception as exc:  # noqa: BLE001 - the PANIC cuts the connection
                errors.append(str(exc)[:200])
                time.sleep(0.2)
        wait_for(lambda: not stack.pg_running(), 30,
                 f"PostgreSQL down after its PANIC (errors seen: {errors[-3:]})", check=web_alive)
        log = stack.pg_log()
        assert "PANIC:  could not write to file \"pg_wal/" in log, log[-3000:]
        assert "shutting down due to startup process failure" in log, log[-3000:]
        with pytest.raises(BaseException, match="did not start"):  # ConfigError: still no space
            stack.pg_start()
        time.sleep(2)
        filler.unlink()
        freed = time.monotonic()
        start_seconds = stack.pg_start()  # what the supervisor's watchdog does
        up = time.monotonic()
        wait_for(lambda: client.tally.first_202_after(up), 30, "a 202 after PostgreSQL is back", check=web_alive)
        figures["wal full"] = {"down_s": freed - full, "pg_start_s": start_seconds,
                               "failed_requests": len(client.tally.failures) - failures,
                               "first_202_after_start_s": client.tally.first_202_after(up) - up}
        time.sleep(1)
    finally:
        client.stop()
    assert client.error is None, repr(client.error)
    figures["total"] = {"spans_sent": len(client.tally.sent), "spans_accepted": len(client.tally.accepted),
                        "answers": dict(client.tally.status)}
    print("\ndisk-full figures (direct mode):", figures)

    # Every failure was a 503 with Retry-After, or no answer at all (never a 500 the SDK would give up on).
    assert not client.unexpected, client.unexpected[:5]
    assert client.tally.status.get("503", 0) >= 5
    _exactly_once(stack, client)
    web_alive()
    assert web.workers_booted() == 1, web.output()[-3000:]


def test_kafka_mode_consumer_waits_for_space_and_dead_letters_nothing(small_disk, tmp_path):
    stack, cleanups = small_disk
    broker = TansuBroker(tmp_path / "tansu.log")
    cleanups.append(broker.close)
    broker.start()
    kafka = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "KAFKA_SESSION_TIMEOUT_MS": SESSION_TIMEOUT_MS,
             "KAFKA_DELIVERY_TIMEOUT_MS": 5000}
    consumer = ConsumerProcess(broker, tmp_path / "consumer.log", DATABASE_URL=stack.database_url,
                               REDIS_URL=stack.redis_url, DATA_DIR=stack.data_dir, **kafka)
    cleanups.append(lambda: kill_group(consumer.proc))
    consumer.start()
    web = Web(stack, tmp_path / "web.log", **kafka)
    cleanups.append(web.kill)
    web.start()
    consumer.wait_assigned(60)

    def alive() -> None:
        assert web.proc.poll() is None, f"web exited:\n{web.output()[-3000:]}"
        assert consumer.proc.poll() is None, f"consumer exited:\n{consumer.output()[-3000:]}"

    client = SpanClient([web.url], stack.key, pause=0.05, retry_pause=0.3)
    client.start()
    try:
        wait_for(lambda: stack.span_counts()[0] >= 300, 60, "the first spans stored", check=alive)
        _fresh_wal_segment(stack)
        filler = fill_disk(stack.pgdata)
        full = time.monotonic()
        wait_for(lambda: consumer.output().count("No space left on device") >= 3, 30,
                 "the consumer meeting the full disk", check=alive)
        stored_while_full = stack.span_counts()[0]
        time.sleep(3)
        # The broker took what the clients sent; the consumer holds it until the database can write.
        assert stack.span_counts()[0] == stored_while_full
        assert client.tally.first_202_after(full + 1), "Kafka mode stopped accepting while the database is full"
        filler.unlink()
        freed = time.monotonic()
        wait_for(lambda: stack.span_counts()[0] > stored_while_full, 30, "spans stored once space is back",
                 check=alive)
        caught_up = time.monotonic() - freed
        time.sleep(1)
    finally:
        client.stop()
    assert client.error is None, repr(client.error)
    wait_for(lambda: set(client.tally.accepted) <= set(stack.stored_ids()), 60, "every accepted span stored",
             check=alive)
    print("\ndisk-full figures (Kafka mode):", {
        "full_s": freed - full, "first_store_after_space_s": caught_up, "spans_accepted": len(client.tally.accepted),
        "answers": dict(client.tally.status), "retries_logged": consumer.output().count("not written")})
    assert broker.read_all(str(Topic.SPANS_DLQ), timeout=5) == []  # a full disk is waited out, never dead-lettered
    assert "sent to llm.spans.raw.dlq" not in consumer.output()
    _exactly_once(stack, client)
    alive()
