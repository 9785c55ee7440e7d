"""The README's first command, for real: `manage.py serve` with a fresh DATA_DIR.

Starts the whole appliance (embedded PostgreSQL and Valkey, gunicorn, Celery worker
and beat) as child processes, talks to it over HTTP, stops it with SIGINT like
Ctrl-C, starts it again on the same data and checks nothing was lost.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Appliance:
    def __init__(self, data_dir: Path, port: int, log: Path) -> None:
        self.data_dir, self.port, self.log = data_dir, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items()
               if k not in ("DATABASE_URL", "POSTGRES_URL", "REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS")}
        env.update(DATA_DIR=str(self.data_dir), PORT=str(self.port), WEB_WORKERS="2", WORKER_CONCURRENCY="1",
                   PYTHONUNBUFFERED="1")
        return env

    def start(self) -> None:
        self.handle = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "manage.py", "serve"], cwd=ROOT, env=self.env(),
                                     stdout=self.handle, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        last = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve exited early:\n{self.output()[-3000:]}"
            try:
                last = httpx.get(f"{self.url}/healthz", timeout=2)
                if last.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"not healthy in time: {last and last.text}\n{self.output()[-3000:]}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self.handle.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def appliance(tmp_path):
    # Not under tmp_path: pytest makes that 0700, and as root the embedded PostgreSQL runs as
    # an unprivileged user who must be able to enter DATA_DIR.
    data_dir = ROOT / ".data" / "e2e" / tmp_path.name
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    app = Appliance(data_dir, _free_port(), tmp_path / "serve.log")
    yield app
    if app.proc and app.proc.poll() is None:
        app.proc.kill()
        app.proc.wait()
    # Whatever happened, leave no server behind.
    subprocess.run(["pkill", "-f", str(app.data_dir)], check=False)
    shutil.rmtree(data_dir, ignore_errors=True)


def test_serve_runs_everything_keeps_data_and_stops_cleanly(appliance):
    appliance.start()
    out = appliance.output()
    login = re.search(r"console / admin login : (\S+) / (\S+)", out)
    key = re.search(r"API key \(default\)\s*: (\S+)", out)
    assert login and key, out[-3000:]
    username, password, api_key = login.group(1), login.group(2), key.group(1)
    auth = {"Authorization": f"Bearer {api_key}"}

    health = httpx.get(f"{appliance.url}/healthz").json()
    assert health == {"status": "ok", "database": "ok", "broker": "ok", "worker": "ok"}

    # curl-like ingest and read back over real HTTP
    assert httpx.post(f"{appliance.url}/v1/spans", json={"span_id": "e2e-1"}).status_code == 401
    posted = httpx.post(f"{appliance.url}/v1/spans", headers=auth, json=[
        {"span_id": "e2e-1", "model": "gpt-4o", "provider": "openai", "prompt_tokens": 100, "completion_tokens": 10,
         "prompt": "hello", "response": "hi"},
        {"span_id": "e2e-2", "model": "claude-sonnet-4", "provider": "anthropic", "prompt_tokens": 10},
    ])
    assert posted.status_code == 202, posted.text
    items = httpx.get(f"{appliance.url}/v1/spans", headers=auth).json()["items"]
    assert {i["span_id"] for i in items} == {"e2e-1", "e2e-2"}
    assert httpx.post(f"{appliance.url}/v1/spans", headers=auth, content=b"{oops").status_code == 400
    big = httpx.post(f"{appliance.url}/v1/spans", headers=auth, content=b"[" + b" " * (6 * 1024 * 1024) + b"]")
    assert big.status_code == 413

    # a second key from the command line while the appliance runs: stdout is the key alone
    made = subprocess.run([sys.executable, "manage.py", "create_api_key", "--project", "second"], cwd=ROOT,
                          env=appliance.env(), capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    second_key = made.stdout.strip()
    assert second_key.startswith("llmo_") and "\n" not in second_key
    second = httpx.get(f"{appliance.url}/v1/spans", headers={"X-API-Key": second_key})
    assert second.status_code == 200 and second.json()["items"] == []  # another project sees nothing

    # console login with the generated password (real CSRF round trip)
    with httpx.Client(base_url=appliance.url, follow_redirects=False) as browser:
        page = browser.get("/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        done = browser.post("/login/", data={"username": username, "password": password,
                                             "csrfmiddlewaretoken": token}, headers={"Referer": f"{appliance.url}/login/"})
        assert done.status_code == 302
        assert "default" in browser.get("/").text
        assert browser.get("/admin/").status_code == 200

    assert appliance.stop() == 0  # stopped on request (Ctrl-C): success, so `make run` ends without an error
    pid_file = appliance.data_dir / "postgres" / "postmaster.pid"
    for _ in range(50):
        if not pid_file.exists():
            break
        time.sleep(0.2)
    assert not pid_file.exists(), "the embedded PostgreSQL is still running after Ctrl-C"
    leftovers = subprocess.run(["pgrep", "-f", str(appliance.data_dir)], capture_output=True, text=True).stdout
    assert leftovers.strip() == "", f"processes left running: {leftovers}"

    # second start on the same data: no new credentials, the spans and keys are still there
    appliance.log.write_text("")
    appliance.start()
    assert "shown ONCE" not in appliance.output()
    items = httpx.get(f"{appliance.url}/v1/spans", headers=auth).json()["items"]
    assert {i["span_id"] for i in items} == {"e2e-1", "e2e-2"}
    appliance.stop()


def _healthy_within(url: str, seconds: float) -> float:
    began = time.monotonic()
    last = None
    while time.monotonic() - began < seconds:
        try:
            last = httpx.get(f"{url}/healthz", timeout=2)
            if last.status_code == 200:
                return time.monotonic() - began
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not healthy within {seconds} s: {last and last.text}")


def _children(pid: int) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(pid).children()]


def test_every_process_killed_with_sigkill_comes_back_without_a_human(appliance):
    import psutil

    appliance.start()
    key = re.search(r"API key \(default\)\s*: (\S+)", appliance.output()).group(1)
    auth = {"Authorization": f"Bearer {key}"}
    state_file = appliance.data_dir / "run" / "supervisor.json"

    def processes() -> dict:
        return json.loads(state_file.read_text())["processes"]

    def cmdline_of(name: str) -> int:
        return processes()[name]["pid"]

    web_master = cmdline_of("web")
    victims = {
        "a gunicorn worker": _children(web_master)[0],
        "the gunicorn master": web_master,
        "the Celery worker": cmdline_of("worker"),
        "Celery beat": cmdline_of("beat"),
        "PostgreSQL": int((appliance.data_dir / "postgres" / "postmaster.pid").read_text().split()[0]),
        "Valkey": int((appliance.data_dir / "valkey" / "valkey.state").read_text().split()[0]),
    }
    recovered = {}
    for number, (what, pid) in enumerate(victims.items()):
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)
        recovered[what] = _healthy_within(appliance.url, 10)
        # and it really works again: a span is stored and read back
        span_id = f"after-kill-{number}"
        posted = httpx.post(f"{appliance.url}/v1/spans", headers=auth, json={"span_id": span_id}, timeout=10)
        assert posted.status_code == 202, (what, posted.text)
    assert appliance.proc.poll() is None, "the appliance stopped"
    state = processes()
    assert {name: p["state"] for name, p in state.items()} == {name: "running" for name in state}
    assert {name: p["restarts"] for name, p in state.items()} == {
        "web": 1, "worker": 1, "beat": 1, "postgres": 1, "valkey": 1}
    metrics = httpx.get(f"{appliance.url}/metrics").text
    assert 'llm_process_restarts_total{process="worker"} 1.0' in metrics
    items = httpx.get(f"{appliance.url}/v1/spans", headers=auth, params={"limit": 100}).json()["items"]
    assert {i["span_id"] for i in items} == {f"after-kill-{n}" for n in range(len(victims))}
    print("healthy again after kill -9 (s):", {k: round(v, 2) for k, v in recovered.items()})

    # Ctrl-C: every child stops gracefully (no SIGKILL), the database last, exit status 0
    began = time.monotonic()
    assert appliance.stop() == 0
    assert time.monotonic() - began < 40
    output = appliance.output()
    assert "SIGKILL" not in output.split("SIGINT: stopping", 1)[1]
    assert not (appliance.data_dir / "postgres" / "postmaster.pid").exists()
    assert not psutil.pid_exists(int(state["web"]["pid"]))


def test_the_appliance_killed_with_sigkill_leaves_no_child_running_and_starts_again(appliance):
    import psutil

    appliance.start()
    state_file = appliance.data_dir / "run" / "supervisor.json"
    children = [p["pid"] for p in json.loads(state_file.read_text())["processes"].values() if p["pid"]]
    appliance.proc.kill()  # SIGKILL: no handler runs
    appliance.proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(
            psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in children):
        time.sleep(0.2)
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in children), "children outlived their supervisor"
    # the embedded database is still up (it is a server, not a child); the next serve adopts and later stops it
    appliance.log.write_text("")
    appliance.start()
    assert appliance.stop() == 0
    assert not (appliance.data_dir / "postgres" / "postmaster.pid").exists()
