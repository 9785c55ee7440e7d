"""Kafka mode scaled out, under faults: three consumers in one group, two web processes, one database.

A client thread posts spans with known span_ids all along (a batch that is not answered
202 is posted again with the same ids, like the SDK). Meanwhile a consumer is SIGKILLed
and replaced (as the supervisor would), the broker is restarted (killed, then started on
the same port and data folder) and the database is restarted (`pg_ctl stop -m fast`,
then started again on the same port). At the end every span that got a 202 is stored
exactly once, the group's lag is 0, and no process exited on its own.

Nothing here shares the test database: the processes have their own data folder with an
embedded PostgreSQL and Valkey (tests/workers/processes.py).
"""

from __future__ import annotations

import shutil
import time
from collections import Counter

import pytest
from confluent_kafka import Consumer, TopicPartition

from ingest.queues import Topic
from tests.kafka_broker import SESSION_TIMEOUT_MS, ConsumerProcess, TansuBroker, wait_for
from tests.workers.processes import SpanClient, Stack, Web, kill_group, new_data_dir
from workers.consumers.base import MAX_BACKOFF_SECONDS

# Minutes of real outages: `make test-faults` (CI runs it after `make test`), not the default run.
pytestmark = [pytest.mark.e2e, pytest.mark.faults]
GROUP = "llm-observe-spans"
PARTITIONS = 3
DELIVERY_TIMEOUT_MS = 5000
OUTAGE_SECONDS = 8  # longer than the delivery timeout
WINDOW = 3.0  # after a fault, the spans accepted this long are what "caught up" waits for


def group_lag(broker: TansuBroker, idle: float = 2.0) -> dict[int, int]:
    """partition -> messages of llm.spans.raw after the group's committed offset.

    Counted by reading from the message before the committed offset (it must exist: nothing
    is committed past the end) until nothing more comes for `idle` seconds. Not from the high
    watermark, nor with end-of-partition events: Tansu on S3 storage answers a stale high
    watermark (the last batch's base offset + 1), though its records are right."""
    topic = str(Topic.SPANS_RAW)
    reader = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": GROUP, "enable.auto.commit": False})
    try:
        committed = {tp.partition: max(tp.offset, 0)
                     for tp in reader.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10)}
        reader.assign([TopicPartition(topic, p, max(offset - 1, 0)) for p, offset in committed.items()])
        first: dict[int, int] = {}
        lag = dict.fromkeys(committed, 0)
        quiet_until = time.monotonic() + idle
        while time.monotonic() < quiet_until:
            for message in reader.consume(500, 0.2):
                if message.error() is not None:
                    continue
                first.setdefault(message.partition(), message.offset())
                lag[message.partition()] += message.offset() >= committed[message.partition()]
                quiet_until = time.monotonic() + idle
    finally:
        reader.close()
    for partition, offset in committed.items():
        if offset:
            assert first.get(partition) == offset - 1, f"committed past the end of partition {partition}: {offset}"
    return lag


@pytest.fixture
def scale_out(tmp_path):
    data_dir = new_data_dir("scaleout")
    stack = Stack(data_dir, tmp_path)
    broker = TansuBroker(tmp_path / "tansu.log", storage=data_dir / "tansu")
    started: dict = {"webs": [], "consumers": []}
    try:
        stack.start().prepare("scaleout")
        broker.start()
        yield stack, broker, started
    finally:
        for web in started["webs"]:
            web.kill()
        for consumer in started["consumers"]:
            kill_group(consumer.proc)
        broker.close()
        stack.close()
        shutil.rmtree(data_dir, ignore_errors=True)


def test_three_consumers_two_webs_ride_out_a_consumer_kill_a_broker_restart_and_a_database_restart(scale_out,
                                                                                                   tmp_path):
    stack, broker, started = scale_out
    kafka = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "KAFKA_SESSION_TIMEOUT_MS": SESSION_TIMEOUT_MS,
             "KAFKA_DELIVERY_TIMEOUT_MS": DELIVERY_TIMEOUT_MS}

    def consumer(name: str) -> ConsumerProcess:
        process = ConsumerProcess(broker, tmp_path / f"{name}.log", DATABASE_URL=stack.database_url,
                                  REDIS_URL=stack.redis_url, DATA_DIR=stack.data_dir, **kafka)
        started["consumers"].append(process)
        return process.start("--batch-size", "200")

    consumers = [consumer(f"consumer-{i}") for i in range(3)]
    webs = [Web(stack, tmp_path / f"web-{i}.log", **kafka).start() for i in range(2)]
    started["webs"] += webs
    for process in consumers:
        process.wait_assigned(60)

    killed: list[ConsumerProcess] = []

    def all_alive() -> None:
        for web in webs:
            assert web.proc.poll() is None, f"web exited:\n{web.output()[-3000:]}"
        for process in started["consumers"]:
            if process not in killed:
                assert process.proc.poll() is None, f"{process.log_path.name} exited:\n{process.output()[-3000:]}"

    def stored_up_to(moment: float) -> bool:
        return client.tally.accepted_until(moment) <= set(stack.stored_ids())

    def caught_up(mark: float, what: str) -> float:
        """Seconds from `mark` until the spans accepted in the WINDOW seconds after it are all stored
        (the partitions of a dead consumer moved, the consumers reconnected)."""
        end = mark + WINDOW
        time.sleep(max(0.0, end - time.monotonic()))
        assert client.tally.accepted_until(end) - client.tally.accepted_until(mark), f"no 202 after the {what}"
        wait_for(lambda: stored_up_to(end), 90, f"the spans accepted after the {what} stored", check=all_alive)
        return time.monotonic() - mark

    client = SpanClient([w.url for w in webs], stack.key)
    figures: dict[str, dict] = {}
    began = time.monotonic()
    client.start()
    try:
        wait_for(lambda: stack.span_counts()[0] >= 400, 60, "the first spans stored", check=all_alive)

        # 1. A consumer that owns a partition is SIGKILLed mid-stream; the supervisor starts another.
        def owner() -> ConsumerProcess | None:
            return next((c for c in consumers if c.output().rfind("assigned llm") > c.output().rfind("revoked llm")),
                        None)

        victim = wait_for(owner, 30, "a consumer that owns a partition", check=all_alive)
        kill_group(victim.proc)
        killed.append(victim)
        fault = time.monotonic()
        consumers.append(consumer("consumer-replacement"))
        figures["consumer kill"] = {"stored_again_s": caught_up(fault, "consumer kill")}

        # 2. The broker is killed and started on the same port and data folder after longer than the
        # delivery timeout: requests waiting on it are answered 503, and the producers must recover.
        before = len(client.tally.failures)
        broker.stop()
        down = time.monotonic()
        time.sleep(OUTAGE_SECONDS)
        broker.start()
        up = time.monotonic()
        wait_for(lambda: client.tally.first_202_after(up), 60, "a 202 after the broker restart", check=all_alive)
        figures["broker restart"] = {
            "down_s": up - down, "first_202_after_start_s": client.tally.first_202_after(up) - up,
            "stored_again_s": caught_up(up, "broker restart"), "failed_requests": len(client.tally.failures) - before}

        # 3. PostgreSQL stops (fast: connections are cut) under load, and is started again on the same port.
        before = len(client.tally.failures)
        stack.pg_stop()
        down = time.monotonic()
        time.sleep(OUTAGE_SECONDS)
        start_seconds = stack.pg_start()
        up = time.monotonic()
        wait_for(lambda: client.tally.first_202_after(up), 60, "a 202 after the database restart", check=all_alive)
        figures["database restart"] = {
            "down_s": up - down, "pg_start_s": start_seconds,
            "first_202_after_start_s": client.tally.first_202_after(up) - up,
            "stored_again_s": caught_up(up, "database restart"), "failed_requests": len(client.tally.failures) - before}
    finally:
        client.stop()
    assert client.error is None, repr(client.error)

    tally = client.tally
    wait_for(lambda: set(tally.accepted) <= set(stack.stored_ids()), 90, "every accepted span stored",
             check=all_alive)
    wait_for(lambda: not any(group_lag(broker).values()), 60, "the group's lag back to 0", check=all_alive)
    time.sleep(2)  # a late re-delivery would show up as a second row now
    rows, distinct, keys = stack.span_counts()
    stored = Counter(stack.stored_ids())
    figures["total"] = {"spans_sent": len(tally.sent), "spans_accepted": len(tally.accepted),
                        "requests": tally.requests, "answers": dict(tally.status), "wall_s": time.monotonic() - began}
    print("\nscale-out figures:", figures)

    assert not client.unexpected, client.unexpected[:5]  # every failure was a 503 with Retry-After, or no answer
    assert set(tally.accepted) <= set(stored), "spans acknowledged with a 202 are missing"
    assert set(stored) <= tally.sent
    assert rows == distinct == keys == len(stored), (rows, distinct, keys)
    assert max(stored.values()) == 1
    assert not any(group_lag(broker).values())
    assert broker.read_all(str(Topic.SPANS_DLQ)) == []  # an outage is waited out, never dead-lettered
    all_alive()
    for web in webs:
        assert web.workers_booted() == 1, f"a web worker died and was booted again:\n{web.output()[-3000:]}"
    # Consumers notice the database is back within their longest backoff (it used to be 30 s).
    assert figures["database restart"]["stored_again_s"] < WINDOW + MAX_BACKOFF_SECONDS + 2
    # The faults were felt: the client saw them, and the group rebalanced after the kill.
    assert figures["broker restart"]["failed_requests"] > 0
    assert figures["database restart"]["failed_requests"] > 0
    assert any("revoked llm.spans.raw" in c.output() for c in consumers[1:])
