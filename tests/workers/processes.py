"""Real appliance processes for the fault tests, all on one database of their own.

`Stack` owns a data folder under .data/e2e (as root the embedded PostgreSQL runs as an
unprivileged user who must be able to enter it; pytest's tmp folders are 0700) with its
own embedded PostgreSQL and Valkey, prepares the schema and an API key like `serve`
does, and stops and starts PostgreSQL on demand. `Web` is a gunicorn process serving
`appliance.wsgi:application`; `SpanClient` posts spans the way the SDK does (the same
span_ids again after a 503 or a connection error) and keeps the tally.

Every process is started in its own session and killed by its process group.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg

from tests.kafka_broker import free_port

ROOT = Path(__file__).resolve().parents[2]
E2E_ROOT = ROOT / ".data" / "e2e"


def kill_group(proc: subprocess.Popen | None, sig: int = signal.SIGKILL) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


class Stack:
    """An embedded PostgreSQL + Valkey in `data_dir`, with the schema and one project's API key."""

    def __init__(self, data_dir: Path, log_dir: Path) -> None:
        self.data_dir, self.log_dir = data_dir, log_dir
        self.database_url = self.redis_url = self.key = ""
        self.project_id = 0
        self._pg = self._valkey = None

    def start(self) -> Stack:
        from appliance import embedded

        # The test process's own settings keep pointing at the test database: only borrow the classes.
        saved = embedded.instances()
        try:
            self._pg = embedded.EmbeddedPostgres(self.data_dir)
            self.database_url = self._pg.ensure_running().url
            self._valkey = embedded.EmbeddedValkey(self.data_dir)
            self.redis_url = self._valkey.ensure_running()
        finally:
            embedded._instances.clear()
            embedded._instances.update(saved)
        return self

    def env(self, **extra) -> dict:
        env = {k: v for k, v in os.environ.items()
               if k not in ("POSTGRES_URL", "KAFKA_BOOTSTRAP_SERVERS", "WITH_KAFKA", "PROMETHEUS_MULTIPROC_DIR")}
        env.update(DATA_DIR=str(self.data_dir), DATABASE_URL=self.database_url, REDIS_URL=self.redis_url,
                   PYTHONUNBUFFERED="1", LOG_LEVEL="INFO")
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def manage(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=self.env(), capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, f"manage.py {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def prepare(self, project: str) -> Stack:
        """What `serve` does before it starts its children, and a key for `project`."""
        self.manage("migrate", "--no-input", "-v", "0")
        self.manage("load_config")
        self.manage("maintain_partitions")
        self.key = self.manage("create_api_key", "--project", project).strip()
        self.project_id = self.query("SELECT id FROM ingest_project WHERE name = %s", [project])[0][0]
        return self

    def query(self, sql: str, params: list | None = None) -> list[tuple]:
        with psycopg.connect(self.database_url, autocommit=True, connect_timeout=5) as conn:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def span_counts(self) -> tuple[int, int, int]:
        """(rows, distinct span_ids, ingest_spankey rows) of the project."""
        return self.query(
            "SELECT (SELECT count(*) FROM ingest_span WHERE project_id = %(p)s),"
            " (SELECT count(DISTINCT span_id) FROM ingest_span WHERE project_id = %(p)s),"
            " (SELECT count(*) FROM ingest_spankey WHERE project_id = %(p)s)", {"p": self.project_id})[0]

    def stored_ids(self) -> list[str]:
        return [r[0] for r in self.query("SELECT span_id FROM ingest_span WHERE project_id = %s", [self.project_id])]

    # --- the database as an operator would handle it -----------------------------
    @property
    def pgdata(self) -> Path:
        return self.data_dir / "postgres"

    def pg_running(self) -> bool:
        return self._pg is not None and self._pg.running_port() is not None

    def pg_pid(self) -> int | None:
        try:
            return int((self.pgdata / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def pg_ctl(self, *args: str) -> subprocess.CompletedProcess:
        return self._pg._run(["pg_ctl", *args, "-D", str(self.pgdata)])

    def pg_stop(self) -> None:
        result = self.pg_ctl("stop", "-m", "fast", "-w", "-t", "60")
        assert result.returncode == 0 or not self.pg_running(), result.stderr

    def pg_start(self) -> float:
        """Start it again on the same port (what the supervisor's watchdog does); answers the seconds it took."""
        from appliance import embedded

        started = time.monotonic()
        saved = embedded.instances()
        try:
            url = self._pg.ensure_running().url
        finally:
            embedded._instances.clear()
            embedded._instances.update(saved)
        assert url == self.database_url, f"PostgreSQL came back elsewhere: {url}"
        return time.monotonic() - started

    def pg_log(self) -> str:
        path = self.data_dir / "logs" / "postgres.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        if self._pg is not None:
            self._pg.stop()
        if self._valkey is not None:
            self._valkey.stop()


class Web:
    """`gunicorn appliance.wsgi:application` on a port of its own (one worker, threads, like serve's)."""

    def __init__(self, stack: Stack, log_path: Path, **env) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = stack.env(**env)
        self.proc: subprocess.Popen | None = None

    def start(self) -> Web:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([
                sys.executable, "-m", "gunicorn", "appliance.wsgi:application", "--bind", f"127.0.0.1:{self.port}",
                "--workers", "1", "--worker-class", "gthread", "--threads", "4", "--timeout", "60",
                "--graceful-timeout", "5", "--no-control-socket",
            ], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"gunicorn exited:\n{self.output()[-3000:]}"
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"{self.url}/healthz", timeout=5)
                return self
            time.sleep(0.2)
        raise AssertionError(f"gunicorn did not answer in time:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def workers_booted(self) -> int:
        """gunicorn boots a worker again when one dies: more than one means a worker exited."""
        return self.output().count("Booting worker")

    def kill(self) -> None:
        kill_group(self.proc)


def span(span_id: str) -> dict:
    return {"span_id": span_id, "trace_id": f"t-{span_id[:-3]}", "model": "gpt-4o-mini", "provider": "openai",
            "prompt_tokens": 42, "completion_tokens": 7, "latency_ms_total": 120.5, "service_name": "faults"}


@dataclass
class Tally:
    sent: set[str] = field(default_factory=set)  # every span_id ever posted
    accepted: dict[str, float] = field(default_factory=dict)  # span_id -> monotonic time of its 202
    requests: int = 0
    status: dict[str, int] = field(default_factory=dict)  # "202", "503", "ConnectError", ...
    failures: list[tuple[float, str]] = field(default_factory=list)  # (time, what) of each non-202
    lock: threading.Lock = field(default_factory=threading.Lock)  # the client thread writes, the test reads

    def accept(self, ids: list[str]) -> None:
        now = time.monotonic()
        with self.lock:
            for span_id in ids:
                self.accepted.setdefault(span_id, now)

    def accepted_until(self, moment: float) -> set[str]:
        with self.lock:
            return {s for s, t in self.accepted.items() if t <= moment}

    def first_202_after(self, moment: float) -> float | None:
        with self.lock:
            times = [t for t in self.accepted.values() if t >= moment]
        return min(times) if times else None


class SpanClient(threading.Thread):
    """Posts batches of new spans to the web processes in turn; a batch that is not acknowledged
    (503, connection refused or reset, timeout) is posted again with the same span_ids, like the SDK."""

    def __init__(self, urls: list[str], key: str, *, batch: int = 20, pause: float = 0.02, prefix: str = "s",
                 retry_pause: float = 0.5, timeout: float = 30.0) -> None:
        super().__init__(name="span-client", daemon=True)
        self.urls, self.key, self.batch, self.pause, self.prefix = urls, key, batch, pause, prefix
        self.retry_pause, self.timeout = retry_pause, timeout
        self.tally = Tally()
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.unexpected: list[str] = []  # answers that are neither 202 nor "retry later"

    def run(self) -> None:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
        clients = [httpx.Client(base_url=url, timeout=self.timeout,
                                headers={"Authorization": f"Bearer {self.key}"}) for url in self.urls]
        try:
            number = 0
            while not self.stopping.is_set():
                ids = [f"{self.prefix}{number:06d}-{i:02d}" for i in range(self.batch)]
                self._deliver(clients, number, ids)
                number += 1
                time.sleep(self.pause)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            for client in clients:
                client.close()

    def _deliver(self, clients: list[httpx.Client], number: int, ids: list[str]) -> None:
        body = [span(i) for i in ids]
        self.tally.sent.update(ids)
        attempt = 0
        # The last batch is still retried after stop() (bounded): what was sent should be delivered.
        deadline = None
        while True:
            client = clients[(number + attempt) % len(clients)]
            attempt += 1
            self.tally.requests += 1
            try:
                response = client.post("/v1/spans", json=body)
                outcome = str(response.status_code)
            except httpx.HTTPError as exc:
                response, outcome = None, type(exc).__name__
            self.tally.status[outcome] = self.tally.status.get(outcome, 0) + 1
            if outcome == "202":
                self.tally.accept(ids)
                return
            self.tally.failures.append((time.monotonic(), outcome))
            if response is not None and (response.status_code != 503 or "Retry-After" not in response.headers):
                self.unexpected.append(f"{outcome}: {response.text[:300]}")
            if self.stopping.is_set():
                deadline = deadline or time.monotonic() + 60
                if time.monotonic() > deadline:
                    return
            time.sleep(self.retry_pause)

    def stop(self) -> None:
        self.stopping.set()
        self.join(120)
        assert not self.is_alive(), "the client did not finish its last batch"


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def mount_small_disk(path: Path, *, megabytes: int, owner: str) -> None:
    """A tmpfs of `megabytes` on `path`, owned by `owner` (the user the embedded PostgreSQL runs as)."""
    import pwd

    import pytest

    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root (CI runs as root)")
    entry = pwd.getpwnam(owner)
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m,mode=0700,uid={entry.pw_uid},"
                           f"gid={entry.pw_gid}", "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed (no CAP_SYS_ADMIN here?): {done.stderr.strip()}")


def unmount(path: Path) -> None:
    subprocess.run(["umount", "--lazy", str(path)], capture_output=True)


def fill_disk(path: Path) -> Path:
    """Write a file in `path` until its filesystem has no space left; answers the file."""
    filler = path / "zz-filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    block = b"\1" * 65536
    try:
        while True:
            os.write(fd, block)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


def new_data_dir(name: str) -> Path:
    path = E2E_ROOT / f"{name}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path
