"""The appliance's process supervisor: restart what dies, stop only when asked (or when it keeps dying).

`manage.py serve` runs web, worker, beat (and the Kafka consumer) under it. Unlike a
foreman (honcho), a child that exits is not a reason to stop the others: it is
restarted after a backoff that grows while it keeps failing fast (0.5 s, 1 s, 2 s ...
up to 30 s) and resets once it stayed up. Only SIGINT/SIGTERM, or a child that failed
`max_retries` times in a row without ever staying up, stops the appliance.

Why not supervisord: it keeps a crash-looping program FATAL forever (we want the
appliance to stop and say so), needs config files and an RPC client for health, and
does not print the children's output prefixed in the foreground. Why not honcho: it
stops everything when one child exits, which is what this replaces.

The children run in their own process groups, so a Ctrl-C in the terminal reaches only
the supervisor, which then stops them in order with SIGTERM (gunicorn drains requests,
Celery finishes its tasks) and SIGKILLs only what outlives its grace period. On Linux
each child also gets PR_SET_PDEATHSIG: if the supervisor itself is SIGKILLed, its
children are told to stop instead of running on unsupervised.

State goes to a JSON file (`state_file`) after every change; /healthz and /metrics
read it (process up/down, restarts), so an outage of one child is visible while the
supervisor restarts it.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


@dataclass
class ProcessSpec:
    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    # Seconds between SIGTERM and SIGKILL when stopping (gunicorn's --graceful-timeout plus a margin).
    grace: float = 30.0


@dataclass
class _Child:
    spec: ProcessSpec
    proc: subprocess.Popen | None = None
    state: str = "starting"  # starting, running, backoff, stopping, stopped, failed
    restarts: int = 0
    failures: int = 0  # exits in a row that came soon after their start
    started_at: float = 0.0
    start_at: float = 0.0  # monotonic time of the next (re)start
    last_exit: str | None = None
    planned: bool = False  # stopped by us to be started again at once (new settings), not a failure
    reader: threading.Thread | None = field(default=None, repr=False)


@dataclass
class Watchdog:
    """Something that is not our child but must be up (the embedded database): checked and revived."""

    name: str
    alive: Callable[[], bool]
    # Starts it again; returns environment changes the children need (a new port), or nothing.
    revive: Callable[[], dict | None]
    state: str = "running"
    restarts: int = 0


class Supervisor:
    def __init__(self, specs: list[ProcessSpec], *, state_file: Path, watchdogs: list[Watchdog] = (),
                 max_retries: int = 6, stable_seconds: float = 10.0, backoff_initial: float = 0.5,
                 backoff_max: float = 30.0, out=None) -> None:
        self.children = [_Child(spec) for spec in specs]
        self.watchdogs = list(watchdogs)
        self.state_file = state_file
        self.max_retries = max_retries
        self.stable_seconds = stable_seconds
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.out = out or sys.stdout
        self._print_lock = threading.Lock()
        self._stop_signal: int | None = None
        self._wake = threading.Event()
        self._width = max([len(c.spec.name) for c in self.children] + [len(w.name) for w in self.watchdogs] + [6])

    # -- output ----------------------------------------------------------------------
    def say(self, name: str, line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        with self._print_lock:
            try:
                self.out.write(f"{stamp} {name:<{self._width}} | {line}\n")
                self.out.flush()
            except (OSError, ValueError):
                pass  # a closed terminal must not kill the supervisor

    def _pump(self, child: _Child, stream) -> None:
        for raw in iter(stream.readline, b""):
            self.say(child.spec.name, raw.decode("utf-8", "replace").rstrip("\n"))
        stream.close()

    # -- children --------------------------------------------------------------------
    def _start(self, child: _Child) -> None:
        spec = child.spec
        try:
            proc = subprocess.Popen(
                spec.argv, env=spec.env, cwd=spec.cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, process_group=0,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        except OSError as exc:
            self.say("serve", f"{spec.name} could not start: {exc}")
            self._exited(child, f"could not start: {exc.strerror}")
            return
        child.proc, child.state, child.started_at = proc, "running", time.monotonic()
        child.reader = threading.Thread(target=self._pump, args=(child, proc.stdout), daemon=True,
                                        name=f"out-{spec.name}")
        child.reader.start()
        self.say("serve", f"{spec.name} started (pid {proc.pid})")

    def _exited(self, child: _Child, how: str) -> None:
        now = time.monotonic()
        child.proc = None
        child.last_exit = how
        if child.planned:
            child.planned, child.state, child.start_at = False, "backoff", now
            return
        if child.started_at and now - child.started_at >= self.stable_seconds:
            child.failures = 0  # it had been up: this is a crash, not a crash loop
        child.failures += 1
        if child.failures > self.max_retries:
            child.state = "failed"
            self.say("serve", f"{child.spec.name} {how} and failed {child.failures} times in a row, each within "
                              f"{self.stable_seconds:g} s of its start: stopping the appliance")
            return
        delay = min(self.backoff_max, self.backoff_initial * 2 ** (child.failures - 1))
        child.state, child.start_at = "backoff", now + delay
        child.restarts += 1
        self.say("serve", f"{child.spec.name} {how}; restarting in {delay:g} s (restart {child.restarts})")

    @staticmethod
    def _end_group(pgid: int) -> None:
        # What the dead child left behind in its group (gunicorn workers still holding the port,
        # Celery pool processes) would compete with its replacement: told to stop now.
        try:
            os.killpg(pgid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def _describe(returncode: int) -> str:
        if returncode < 0:
            try:
                return f"was killed by {signal.Signals(-returncode).name}"
            except ValueError:
                return f"was killed by signal {-returncode}"
        return f"exited (rc={returncode})"

    # -- state file ------------------------------------------------------------------
    def snapshot(self) -> dict:
        processes = {}
        for child in self.children:
            processes[child.spec.name] = {
                "state": child.state, "pid": child.proc.pid if child.proc else None,
                "restarts": child.restarts, "last_exit": child.last_exit,
            }
        for dog in self.watchdogs:
            processes[dog.name] = {"state": dog.state, "pid": None, "restarts": dog.restarts, "last_exit": None}
        return {"pid": os.getpid(), "updated": time.time(), "processes": processes}

    def _write_state(self) -> None:
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_name(self.state_file.name + ".tmp")
            tmp.write_text(json.dumps(self.snapshot()))
            os.replace(tmp, self.state_file)
        except OSError as exc:
            self.say("serve", f"cannot write {self.state_file}: {exc.strerror}")

    # -- the loop ----------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal is None:
            self._stop_signal = signum
        self._wake.set()

    def run(self) -> int:
        """Start everything, supervise until a signal (exit 0) or a crash loop (exit 1)."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            for child in self.children:
                self._start(child)
            self._write_state()
            failed = self._supervise()
        finally:
            self.stop_all()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return 1 if failed else 0

    def _supervise(self) -> bool:
        next_watch = time.monotonic() + 2.0
        while self._stop_signal is None:
            changed = False
            now = time.monotonic()
            for child in self.children:
                if child.proc is not None and child.proc.poll() is not None:
                    self._end_group(child.proc.pid)
                    self._exited(child, self._describe(child.proc.returncode))
                    changed = True
                    if child.state == "failed":
                        self._write_state()
                        return True
                elif child.state == "backoff" and now >= child.start_at:
                    self._start(child)
                    changed = True
            if now >= next_watch:
                next_watch = now + 2.0
                changed |= self._watch()
            if changed:
                self._write_state()
            self._wake.wait(0.2)
            self._wake.clear()
        name = signal.Signals(self._stop_signal).name
        self.say("serve", f"{name}: stopping")
        return False

    def _watch(self) -> bool:
        changed = False
        for dog in self.watchdogs:
            try:
                alive = dog.alive()
            except Exception:  # noqa: BLE001 - a failing probe means "not alive"
                alive = False
            if alive:
                if dog.state != "running":
                    dog.state, changed = "running", True
                continue
            self.say("serve", f"{dog.name} is not running; starting it again")
            dog.state, changed = "restarting", True
            dog.restarts += 1
            self._write_state()
            try:
                changes = dog.revive()
                dog.state = "running"
                self.say("serve", f"{dog.name} is running again")
                if changes:
                    self._restart_with(changes, reason=f"{dog.name} came back with new settings")
            except BaseException as exc:  # noqa: BLE001 - ConfigError is a SystemExit: report, retry next round
                self.say("serve", f"{dog.name} did not start: {exc}")
        return changed

    def _restart_with(self, changes: dict, *, reason: str) -> None:
        """Every child needs new environment values: stop each (SIGTERM) and start it again at once."""
        self.say("serve", f"{reason}: restarting every process")
        for child in self.children:
            child.spec.env.update(changes)
            if child.proc is not None and child.proc.poll() is None:
                child.planned = True
                child.proc.send_signal(signal.SIGTERM)

    def stop_all(self) -> None:
        """SIGTERM every running child at once, wait for each within its grace, SIGKILL the rest."""
        running = [c for c in self.children if c.proc is not None and c.proc.poll() is None]
        for child in self.children:
            if child.state in ("backoff", "starting"):
                child.state = "stopped"
        for child in running:
            child.state = "stopping"
            try:
                child.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        self._write_state()
        for child in running:
            deadline = time.monotonic() + child.spec.grace
            while child.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if child.proc.poll() is None:
                self.say("serve", f"{child.spec.name} did not stop within {child.spec.grace:g} s: SIGKILL")
                try:
                    os.killpg(child.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                child.proc.wait()
            else:
                self.say("serve", f"{child.spec.name} stopped ({self._describe(child.proc.returncode)})")
            if child.reader is not None:
                child.reader.join(timeout=2)
            child.state, child.proc = "stopped", None
        self._write_state()


def state_file(data_dir: Path) -> Path:
    return Path(data_dir) / "run" / "supervisor.json"


def read_state(state_file: Path) -> dict | None:
    """The supervisor's last state, or None when no live supervisor wrote one."""
    try:
        state = json.loads(state_file.read_text())
        pid = int(state["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return state
