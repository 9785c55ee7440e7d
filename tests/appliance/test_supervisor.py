"""The supervisor on its own, with small real child processes: restart, backoff, crash loop, stop, orphans.

Each scenario runs the supervisor in a separate Python process (it installs signal
handlers, and a test must be able to SIGKILL it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_RUNNER = """
import json, sys
from pathlib import Path
from appliance.supervisor import ProcessSpec, Supervisor

config = json.loads(sys.argv[1])
specs = [ProcessSpec(name, argv, {"PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}, ".", grace=config["grace"])
         for name, argv in config["children"].items()]
supervisor = Supervisor(specs, state_file=Path(config["state"]), max_retries=config["retries"],
                        stable_seconds=config["stable"], backoff_initial=0.1, backoff_max=0.4)
sys.exit(supervisor.run())
"""


def py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def start(tmp_path: Path, children: dict, *, retries: int = 5, stable: float = 1.0, grace: float = 5.0):
    state = tmp_path / "run" / "supervisor.json"
    config = {"children": children, "state": str(state), "retries": retries, "stable": stable, "grace": grace}
    log = open(tmp_path / "supervisor.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", _RUNNER, json.dumps(config)], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, state, tmp_path / "supervisor.log"


def wait_for(predicate, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def read(state: Path) -> dict:
    try:
        return json.loads(state.read_text())["processes"]
    except (OSError, ValueError, KeyError):
        return {}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not alive: it only waits for its parent to collect it.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


SLEEPER = py("import time\nwhile True: time.sleep(1)")


@pytest.fixture
def cleanup():
    procs = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_killed_child_is_restarted_and_the_others_keep_running(tmp_path, cleanup):
    proc, state, _ = start(tmp_path, {"a": SLEEPER, "b": SLEEPER})
    cleanup.append(proc)
    first = wait_for(lambda: (p := read(state)) and all(x["pid"] for x in p.values()) and p)
    os.kill(first["a"]["pid"], signal.SIGKILL)
    again = wait_for(lambda: (p := read(state)) and p["a"]["pid"] not in (None, first["a"]["pid"]) and p)
    assert again["a"]["restarts"] == 1 and again["a"]["last_exit"] == "was killed by SIGKILL"
    assert again["a"]["state"] == "running"
    assert again["b"]["pid"] == first["b"]["pid"] and again["b"]["restarts"] == 0
    assert proc.poll() is None, "one dead child stopped the supervisor"

    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 0  # stopped on request: success
    final = read(state)
    assert {p["state"] for p in final.values()} == {"stopped"}
    assert not alive(again["a"]["pid"]) and not alive(again["b"]["pid"])


def test_a_child_that_keeps_failing_at_start_stops_everything_with_exit_1(tmp_path, cleanup):
    proc, state, log = start(tmp_path, {"broken": py("import sys; sys.exit(3)"), "fine": SLEEPER}, retries=3)
    cleanup.append(proc)
    assert proc.wait(timeout=20) == 1
    processes = read(state)
    assert processes["broken"]["state"] == "failed" and processes["broken"]["restarts"] == 3
    assert processes["fine"]["state"] == "stopped"
    text = log.read_text()
    assert "broken exited (rc=3) and failed 4 times in a row" in text
    # backoff doubled between attempts: 0.1, 0.2, 0.4 s
    assert "restarting in 0.1 s (restart 1)" in text and "restarting in 0.4 s (restart 3)" in text


def test_a_child_that_stayed_up_is_restarted_however_often_it_crashes(tmp_path, cleanup):
    # Up for 0.6 s each time with stable_seconds 0.5: every exit is a crash, never a crash loop.
    proc, state, _ = start(tmp_path, {"flaky": py("import time, sys; time.sleep(0.6); sys.exit(1)")},
                           retries=1, stable=0.5)
    cleanup.append(proc)
    wait_for(lambda: read(state).get("flaky", {}).get("restarts", 0) >= 4, timeout=20)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


def test_a_child_that_ignores_sigterm_is_killed_after_its_grace(tmp_path, cleanup):
    stubborn = py("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: time.sleep(1)")
    proc, state, log = start(tmp_path, {"stubborn": stubborn}, grace=1.0)
    cleanup.append(proc)
    pid = wait_for(lambda: read(state).get("stubborn", {}).get("pid"))
    time.sleep(0.3)  # let it install its handler
    began = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 0
    assert 0.9 <= time.monotonic() - began < 5
    assert "did not stop within 1 s: SIGKILL" in log.read_text()
    assert not alive(pid)


def test_children_stop_when_the_supervisor_is_sigkilled(tmp_path, cleanup):
    proc, state, _ = start(tmp_path, {"a": SLEEPER})
    cleanup.append(proc)
    pid = wait_for(lambda: read(state).get("a", {}).get("pid"))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_for(lambda: not alive(pid), timeout=10)


def test_what_a_dead_child_left_in_its_group_is_stopped_before_the_restart(tmp_path, cleanup):
    # A parent that forks a grandchild (like gunicorn's master and its workers), then is SIGKILLed.
    forking = py("""
        import os, time
        if os.fork() == 0:
            while True: time.sleep(1)
        while True: time.sleep(1)
    """)
    proc, state, _ = start(tmp_path, {"master": forking})
    cleanup.append(proc)
    pid = wait_for(lambda: read(state).get("master", {}).get("pid"))
    grandchild = wait_for(lambda: [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()])[0]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: read(state).get("master", {}).get("restarts") == 1)
    wait_for(lambda: not alive(grandchild), timeout=5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
