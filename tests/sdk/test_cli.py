"""`llm-observe start|status|stop|logs` against a stand-in `docker` on PATH.

There is no Docker engine here, so the stand-in is a test double for the engine: a script named
`docker` that records each argument vector it gets (one JSON list a line) and keeps the container's
state in a file. The tests assert the exact command lines the CLI runs: loopback-only ports by
default, 4318 published, the 60 s stop timeout, no `docker run` when the image is missing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from instrumentation_sdk import cli

ROOT = Path(__file__).resolve().parents[2]
NAME = "instrumentation-api-allinone"

FAKE_DOCKER = '''#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
state = os.environ["FAKE_DOCKER_STATE"]
images = os.environ["FAKE_DOCKER_IMAGES"]
def have_image(name):
    return os.path.exists(images) and name in open(images).read().split()
if args[0] == "info":
    if os.environ.get("FAKE_DOCKER_DAEMON") == "down":
        print("Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?",
              file=sys.stderr)
        sys.exit(1)
    print("27.3.1")
elif args[:2] == ["container", "inspect"]:
    if not os.path.exists(state):
        print("Error: No such container: " + args[-1], file=sys.stderr)
        sys.exit(1)
    print(open(state).read())
elif args[:2] == ["image", "inspect"]:
    if not have_image(args[-1]):
        print("Error: No such image: " + args[-1], file=sys.stderr)
        sys.exit(1)
    print("sha256:0123")
elif args[0] == "pull":
    print("Error response from daemon: pull access denied for " + args[-1].split(":")[0]
          + ", repository does not exist or may require 'docker login'", file=sys.stderr)
    sys.exit(1)
elif args[0] == "run":
    if not have_image(args[-1]):
        sys.exit(125)
    open(state, "w").write("running")
    print("4f1c0ffee")
elif args[0] == "start":
    open(state, "w").write("running")
    print(args[-1])
elif args[0] == "stop":
    open(state, "w").write("exited")
    print(args[-1])
elif args[0] == "logs":
    print("first start: admin password s3cret")
else:
    print("fake docker: unexpected " + " ".join(args), file=sys.stderr)
    sys.exit(2)
'''


def free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


class Engine:
    def __init__(self, tmp_path: Path):
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        docker = self.bin / "docker"
        docker.write_text(FAKE_DOCKER.format(python=sys.executable))
        docker.chmod(0o755)
        self.log = tmp_path / "docker.log"
        self.state = tmp_path / "state"
        self.images = tmp_path / "images"
        self.env = {k: v for k, v in os.environ.items() if k != "LLM_OBSERVE_DOCKER"}
        self.env.update(PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}", FAKE_DOCKER_LOG=str(self.log),
                        FAKE_DOCKER_STATE=str(self.state), FAKE_DOCKER_IMAGES=str(self.images))

    def has_image(self, *names: str) -> None:
        self.images.write_text("\n".join(names))

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "instrumentation_sdk.cli", *args], capture_output=True,
                              text=True, timeout=120, env={**self.env, **env}, cwd=ROOT)


@pytest.fixture
def engine(tmp_path):
    return Engine(tmp_path)


def ports_flags(api, grafana, grpc, http, prom):
    return ["--api-port", str(api), "--grafana-port", str(grafana), "--otlp-port", str(grpc),
            "--otlp-http-port", str(http), "--prometheus-port", str(prom)]


def test_start_publishes_on_loopback_only_with_4318_and_a_60s_stop_timeout(engine):
    engine.has_image("llm-observe:1.2")
    api, grafana, grpc, http, prom = free_ports(5)
    out = engine.cli("start", "--tag", "1.2", "--wait", "0", *ports_flags(api, grafana, grpc, http, prom))
    assert out.returncode == 0, out.stderr
    assert engine.calls() == [
        ["info", "--format", "{{.ServerVersion}}"],
        ["container", "inspect", "--format", "{{.State.Status}}", NAME],
        ["image", "inspect", "--format", "{{.Id}}", "llm-observe:1.2"],
        ["run", "-d", "--name", NAME, "--restart", "unless-stopped", "--stop-timeout", "60",
         "-v", f"{NAME}-data:/data",
         "-p", f"127.0.0.1:{api}:8000", "-p", f"127.0.0.1:{grafana}:3000", "-p", f"127.0.0.1:{grpc}:4317",
         "-p", f"127.0.0.1:{http}:4318", "-p", f"127.0.0.1:{prom}:9090", "llm-observe:1.2"],
    ]
    assert f"API and console http://127.0.0.1:{api} (on 127.0.0.1 only)" in out.stdout
    assert f"llm-observe logs --name {NAME}" in out.stdout


def test_default_ports_are_those_of_the_docs():
    args = cli._parser().parse_args(["start"])
    assert cli.run_command(args) == [
        "run", "-d", "--name", NAME, "--restart", "unless-stopped", "--stop-timeout", "60",
        "-v", f"{NAME}-data:/data", "-p", "127.0.0.1:8002:8000", "-p", "127.0.0.1:3002:3000",
        "-p", "127.0.0.1:4317:4317", "-p", "127.0.0.1:4318:4318", "-p", "127.0.0.1:9090:9090", "llm-observe:latest"]


def test_publish_all_and_no_stack(engine):
    engine.has_image("llm-observe:latest")
    api, grafana, grpc, http, prom = free_ports(5)
    out = engine.cli("start", "--wait", "0", "--publish-all", "-e", "ALLOWED_HOSTS=observe.example.com,127.0.0.1",
                     *ports_flags(api, grafana, grpc, http, prom))
    assert out.returncode == 0, out.stderr
    run = engine.calls()[-1]
    assert run[run.index("-e"):] == [
        "-e", "ALLOWED_HOSTS=observe.example.com,127.0.0.1",
        "-p", f"0.0.0.0:{api}:8000", "-p", f"0.0.0.0:{grafana}:3000", "-p", f"0.0.0.0:{grpc}:4317",
        "-p", f"0.0.0.0:{http}:4318", "-p", f"0.0.0.0:{prom}:9090", "llm-observe:latest"]
    assert "(on every interface)" in out.stdout

    engine.state.unlink()
    out = engine.cli("start", "--wait", "0", "--no-stack", "--name", "small", "--api-port", str(api))
    assert out.returncode == 0, out.stderr
    assert engine.calls()[-1] == [
        "run", "-d", "--name", "small", "--restart", "unless-stopped", "--stop-timeout", "60", "-v", "small-data:/data",
        "-e", "WITH_OBSERVABILITY_STACK=0", "-p", f"127.0.0.1:{api}:8000", "llm-observe:latest"]
    assert "Grafana" not in out.stdout


def test_missing_image_says_how_to_build_it_and_runs_nothing(engine):
    out = engine.cli("start", "--wait", "0", *ports_flags(*free_ports(5)))
    assert out.returncode == 1
    assert [c[0] for c in engine.calls()] == ["info", "container", "image", "pull"]
    assert engine.calls()[-1] == ["pull", "llm-observe:latest"]
    assert "image llm-observe:latest not found" in out.stderr
    assert "pull access denied" in out.stderr
    assert "docker build -f docker/Dockerfile -t llm-observe:latest ." in out.stderr


def test_no_docker_on_path_and_daemon_down(engine, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for command in ("start", "status", "stop", "logs"):
        out = engine.cli(command, PATH=str(empty))
        assert out.returncode == 1
        assert "Docker is not installed or not on PATH" in out.stderr and "make run" in out.stderr
    out = engine.cli("status", FAKE_DOCKER_DAEMON="down")
    assert out.returncode == 1
    assert "the Docker daemon is not reachable (Cannot connect to the Docker daemon" in out.stderr
    assert engine.calls() == [["info", "--format", "{{.ServerVersion}}"]]


def test_status_stop_logs_and_restart_reuse_the_container(engine):
    engine.has_image("llm-observe:latest")
    assert engine.cli("status").returncode == 1
    assert engine.cli("start", "--wait", "0", *ports_flags(*free_ports(5))).returncode == 0
    assert engine.cli("status").stdout.strip() == f"{NAME}: running"
    out = engine.cli("start", "--wait", "0")
    assert out.returncode == 0 and "already running" in out.stdout

    out = engine.cli("stop")
    assert out.returncode == 0, out.stderr
    assert engine.calls()[-1] == ["stop", "--time", "60", NAME]
    assert engine.cli("status").returncode == 1
    assert engine.cli("stop").stdout.strip() == f"{NAME} is not running (exited)"

    out = engine.cli("logs", "--tail", "50")
    assert out.returncode == 0 and "admin password s3cret" in out.stdout
    assert engine.calls()[-1] == ["logs", "--tail", "50", NAME]
    engine.cli("logs", "-f")
    assert engine.calls()[-1] == ["logs", "--follow", NAME]

    assert engine.cli("start", "--wait", "0").returncode == 0
    assert engine.calls()[-1] == ["start", NAME]
    assert sum(call[0] == "run" for call in engine.calls()) == 1  # started again, not re-created


def test_start_refuses_busy_ports(engine):
    engine.has_image("llm-observe:latest")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        api, grafana, grpc, http, _ = free_ports(5)
        out = engine.cli("start", "--wait", "0", *ports_flags(api, grafana, grpc, http, port))
    assert out.returncode == 1 and f"--prometheus-port {port}" in out.stderr
    assert all(call[0] != "run" for call in engine.calls())
