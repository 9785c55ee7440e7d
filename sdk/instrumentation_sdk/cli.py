"""`llm-observe start|status|stop|check`.

start/status/stop drive the all-in-one appliance container with the docker CLI
(flags of instrumentation-sdk 1.8.1); check verifies LLM_OBSERVE_URL and
LLM_OBSERVE_API_KEY against a running appliance. Exit status 0 on success, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

DEFAULT_NAME = "instrumentation-api-allinone"
DEFAULT_IMAGE = "llm-observe"
DEFAULT_TAG = "latest"
CONTAINER_PORTS = {"api_port": 8000, "grafana_port": 3000, "otlp_port": 4317, "prometheus_port": 9090}


def _err(message: str) -> int:
    print(f"llm-observe: {message}", file=sys.stderr)
    return 1


def _docker() -> str | None:
    return shutil.which(os.environ.get("LLM_OBSERVE_DOCKER", "docker"))


def _run(docker: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([docker, *args], capture_output=True, text=True, timeout=timeout)


def _require_docker() -> tuple[str | None, int]:
    docker = _docker()
    if docker is None:
        return None, _err("Docker is not installed or not on PATH; `start`, `status` and `stop` need it. "
                          "Install Docker (https://docs.docker.com/get-docker/), or run the appliance without "
                          "Docker from a source checkout with `make run`.")
    try:
        info = _run(docker, "info", "--format", "{{.ServerVersion}}", timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, _err(f"cannot run docker: {exc}")
    if info.returncode != 0:
        detail = (info.stderr or info.stdout).strip().splitlines()[-1:] or ["no answer"]
        return None, _err(f"the Docker daemon is not reachable ({detail[0]}). Is it running, and may this user use it?")
    return docker, 0


def _container_state(docker: str, name: str) -> str | None:
    """'running', 'exited', ... or None when there is no such container."""
    out = _run(docker, "inspect", "--format", "{{.State.Status}}", name, timeout=30)
    return out.stdout.strip() if out.returncode == 0 else None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _wait_healthy(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=3) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(2)
    return False


def cmd_start(args: argparse.Namespace) -> int:
    docker, code = _require_docker()
    if docker is None:
        return code
    state = _container_state(docker, args.name)
    url = f"http://127.0.0.1:{args.api_port}"
    if state == "running":
        print(f"{args.name} is already running: API {url}, Grafana http://127.0.0.1:{args.grafana_port}")
        return 0
    if state is not None:  # exists, stopped: reuse it (its volume holds the data and credentials)
        out = _run(docker, "start", args.name)
        if out.returncode != 0:
            return _err(f"could not start the existing container {args.name}: {out.stderr.strip()}")
        print(f"started the existing container {args.name}")
    else:
        busy = [f"{flag.replace('_', '-')} {getattr(args, flag)}" for flag in CONTAINER_PORTS
                if not _port_free(getattr(args, flag))]
        if busy:
            return _err(f"port(s) already in use: {', '.join('--' + b for b in busy)}; choose others with those flags")
        image = f"{args.image}:{args.tag}"
        command = ["run", "-d", "--name", args.name, "--restart", "unless-stopped",
                   "-v", f"{args.name}-data:/data"]
        for flag, inside in CONTAINER_PORTS.items():
            command += ["-p", f"{getattr(args, flag)}:{inside}"]
        command.append(image)
        out = _run(docker, *command, timeout=600)
        if out.returncode != 0:
            return _err(f"docker run {image} failed: {out.stderr.strip()}")
        print(f"started {args.name} from {image}")
    if args.wait and not _wait_healthy(url, args.wait):
        return _err(f"{args.name} runs but {url}/healthz did not answer 200 within {args.wait:.0f}s; "
                    f"see `docker logs {args.name}`")
    print(f"API {url}  Grafana http://127.0.0.1:{args.grafana_port}  OTLP :{args.otlp_port}  "
          f"Prometheus :{args.prometheus_port}")
    print(f"first start: the admin password and API key are printed once in `docker logs {args.name}`")
    return 0


def _existing(args: argparse.Namespace, missing: str) -> tuple[str | None, str | None, int]:
    """(docker, the container's state, 0), or (None, None, exit code) after saying why not."""
    docker, code = _require_docker()
    if docker is None:
        return None, None, code
    state = _container_state(docker, args.name)
    if state is None:
        print(missing)
        return None, None, 1
    return docker, state, 0


def cmd_status(args: argparse.Namespace) -> int:
    docker, state, code = _existing(args, f"{args.name}: not created (run `llm-observe start`)")
    if docker is None:
        return code
    print(f"{args.name}: {state}")
    return 0 if state == "running" else 1


def cmd_stop(args: argparse.Namespace) -> int:
    docker, state, code = _existing(args, f"{args.name}: no such container")
    if docker is None:
        return code
    if state != "running":
        print(f"{args.name} is not running ({state})")
        return 0
    out = _run(docker, "stop", args.name, timeout=120)
    if out.returncode != 0:
        return _err(f"docker stop {args.name} failed: {out.stderr.strip()}")
    print(f"stopped {args.name} (data kept in the volume {args.name}-data)")
    return 0


def check(url: str | None, api_key: str | None, timeout: float = 10.0) -> tuple[bool, str]:
    """(ok, message) for GET {url}/v1/spans?limit=1 with the key."""
    if not url:
        return False, "no URL: set LLM_OBSERVE_URL or pass --url"
    if not api_key:
        return False, "no API key: set LLM_OBSERVE_API_KEY or pass --api-key"
    url = url.rstrip("/")
    request = urllib.request.Request(f"{url}/v1/spans?limit=1", headers={
        "Authorization": f"Bearer {api_key}", "Accept": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            body = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        detail = ""
        try:
            detail = json.loads(exc.read() or b"{}").get("error", "")
        except ValueError:
            pass
        reasons = {401: "the API key is missing or unknown", 403: "the API key was revoked",
                   404: "no llm-observe API at this URL"}
        reason = reasons.get(exc.code, f"HTTP {exc.code}")
        return False, f"{url}: {reason}" + (f" ({detail})" if detail else "")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"cannot reach {url}: {reason}"
    try:
        payload = json.loads(body)
    except ValueError:
        return False, f"{url} answered {status} but not with JSON: is it an llm-observe appliance?"
    if status != 200 or "items" not in payload:
        return False, f"{url} answered {status} without a span list: is it an llm-observe appliance?"
    return True, f"OK: {url} accepted the key"


def cmd_check(args: argparse.Namespace) -> int:
    from instrumentation_sdk._config import config_from_env

    cfg = config_from_env()
    url = args.url or os.environ.get("LLM_OBSERVE_URL")
    api_key = args.api_key or os.environ.get("LLM_OBSERVE_API_KEY")
    results = []
    if cfg.kafka:
        # Spans go to the broker; the appliance's consumer checks the key (rejections go to its DLQ).
        from instrumentation_sdk._kafka import check_topic

        results.append(check_topic(cfg, args.timeout))
        if not api_key:
            results.append((False, "no API key: set LLM_OBSERVE_API_KEY or pass --api-key"))
        elif url:
            results.append(check(url, api_key, args.timeout))
    else:
        results.append(check(url, api_key, args.timeout))
    for ok, message in results:
        print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if all(ok for ok, _ in results) else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-observe", description="Run and check an llm-observe appliance.")
    sub = parser.add_subparsers(dest="command", required=True)

    def container_flags(p: argparse.ArgumentParser) -> None:
        # The same flags on start, status and stop, as in 1.8.1 (status/stop only use --name).
        p.add_argument("--name", default=DEFAULT_NAME, help=f"container name (default {DEFAULT_NAME})")
        p.add_argument("--image", default=os.environ.get("LLM_OBSERVE_IMAGE", DEFAULT_IMAGE))
        p.add_argument("--tag", default=DEFAULT_TAG)
        p.add_argument("--api-port", type=int, default=8002)
        p.add_argument("--grafana-port", type=int, default=3002)
        p.add_argument("--otlp-port", type=int, default=4317)
        p.add_argument("--prometheus-port", type=int, default=9090)

    start = sub.add_parser("start", help="start the all-in-one appliance container (docker)")
    container_flags(start)
    start.add_argument("--wait", type=float, default=180.0, help="seconds to wait for /healthz (0: do not wait)")
    start.set_defaults(func=cmd_start)

    status = sub.add_parser("status", help="is the appliance container running?")
    container_flags(status)
    status.set_defaults(func=cmd_status)

    stop = sub.add_parser("stop", help="stop the appliance container (data is kept)")
    container_flags(stop)
    stop.set_defaults(func=cmd_stop)

    chk = sub.add_parser("check", help="verify LLM_OBSERVE_URL and LLM_OBSERVE_API_KEY against the appliance "
                                       "(with the Kafka transport: the broker and its spans topic too)")
    chk.add_argument("--url", default=None)
    chk.add_argument("--api-key", default=None)
    chk.add_argument("--timeout", type=float, default=10.0)
    chk.set_defaults(func=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
