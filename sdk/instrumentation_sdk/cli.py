"""`llm-observe start|status|stop|logs|check|wal`.

start/status/stop/logs drive the all-in-one appliance container with the docker CLI
(flags of instrumentation-sdk 1.8.1); check verifies LLM_OBSERVE_URL and
LLM_OBSERVE_API_KEY against a running appliance; `wal status|list|replay|purge|recover`
shows and manages the SDK's local files (the WAL, its dead letters, spill files of
killed processes). Exit status 0 on success, 1 otherwise.
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
# flag -> port inside the container. The API always; the others belong to the observability stack
# (Grafana, Tempo's OTLP gRPC/HTTP, Prometheus) and are published only when it runs.
API_PORT = {"api_port": 8000}
STACK_PORTS = {"grafana_port": 3000, "otlp_port": 4317, "otlp_http_port": 4318, "prometheus_port": 9090}
# What the docs promise for `docker stop`: the app drains its batches, the stack flushes its WAL.
STOP_TIMEOUT = 60
LOOPBACK = "127.0.0.1"


def _err(message: str) -> int:
    print(f"llm-observe: {message}", file=sys.stderr)
    return 1


def _docker() -> str | None:
    return shutil.which(os.environ.get("LLM_OBSERVE_DOCKER", "docker"))


def _run(docker: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([docker, *args], capture_output=True, text=True, timeout=timeout)


def _last_line(out: subprocess.CompletedProcess) -> str:
    lines = (out.stderr or out.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit status {out.returncode}"


def _require_docker() -> tuple[str | None, int]:
    docker = _docker()
    if docker is None:
        return None, _err("Docker is not installed or not on PATH; `start`, `status`, `stop` and `logs` need it. "
                          "Install Docker (https://docs.docker.com/get-docker/), or run the appliance without "
                          "Docker from a source checkout with `make run`.")
    try:
        info = _run(docker, "info", "--format", "{{.ServerVersion}}", timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, _err(f"cannot run docker: {exc}")
    if info.returncode != 0:
        return None, _err(f"the Docker daemon is not reachable ({_last_line(info)}). "
                          "Is it running, and may this user use it?")
    return docker, 0


def _container_state(docker: str, name: str) -> str | None:
    """'running', 'exited', ... or None when there is no such container."""
    out = _run(docker, "container", "inspect", "--format", "{{.State.Status}}", name, timeout=30)
    return out.stdout.strip() if out.returncode == 0 else None


def _ensure_image(docker: str, image: str) -> int:
    """0 when the image is here (pulled if a registry has it), else 1 after saying how to get it."""
    if _run(docker, "image", "inspect", "--format", "{{.Id}}", image, timeout=30).returncode == 0:
        return 0
    print(f"image {image} is not here; trying `docker pull {image}`", file=sys.stderr)
    pulled = _run(docker, "pull", image, timeout=1800)
    if pulled.returncode == 0:
        return 0
    return _err(f"image {image} not found: not built on this machine, and `docker pull` failed "
                f"({_last_line(pulled)}). Build it from a source checkout: "
                f"`docker build -f docker/Dockerfile -t {image} .`, or pass the image you use "
                f"with --image and --tag (or LLM_OBSERVE_IMAGE).")


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _published(args: argparse.Namespace) -> dict[str, int]:
    """flag -> container port, for the ports `start` publishes."""
    return {**API_PORT, **({} if args.no_stack else STACK_PORTS)}


def _host_url(args: argparse.Namespace, port: int) -> str:
    host = LOOPBACK if args.bind in ("0.0.0.0", "::") else args.bind
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def run_command(args: argparse.Namespace) -> list[str]:
    """The `docker run` arguments for a new container (its volume keeps data and credentials)."""
    image = f"{args.image}:{args.tag}"
    command = ["run", "-d", "--name", args.name, "--restart", "unless-stopped",
               "--stop-timeout", str(STOP_TIMEOUT), "-v", f"{args.name}-data:/data"]
    if args.no_stack:
        command += ["-e", "WITH_OBSERVABILITY_STACK=0"]
    for item in args.env:
        command += ["-e", item]
    for flag, inside in _published(args).items():
        host = f"[{args.bind}]" if ":" in args.bind else args.bind
        command += ["-p", f"{host}:{getattr(args, flag)}:{inside}"]
    command.append(image)
    return command


def _wait_healthy(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.monotonic() < deadline:
        try:
            with opener.open(f"{url}/healthz", timeout=3) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(2)
    return False


def cmd_start(args: argparse.Namespace) -> int:
    if args.publish_all:
        args.bind = "0.0.0.0"
    docker, code = _require_docker()
    if docker is None:
        return code
    state = _container_state(docker, args.name)
    url = _host_url(args, args.api_port)
    if state == "running":
        print(f"{args.name} is already running (`docker port {args.name}` shows its ports)")
        return 0
    if state is not None:  # exists, stopped: reuse it (its volume holds the data and credentials)
        out = _run(docker, "start", args.name)
        if out.returncode != 0:
            return _err(f"could not start the existing container {args.name}: {_last_line(out)}")
        print(f"started the existing container {args.name} (with the ports and image it was created with)")
    else:
        busy = [f"--{flag.replace('_', '-')} {getattr(args, flag)}" for flag in _published(args)
                if not _port_free(args.bind, getattr(args, flag))]
        if busy:
            return _err(f"port(s) already in use on {args.bind}: {', '.join(busy)}; "
                        "choose others with those flags")
        image = f"{args.image}:{args.tag}"
        if _ensure_image(docker, image):
            return 1
        out = _run(docker, *run_command(args), timeout=600)
        if out.returncode != 0:
            return _err(f"docker run {image} failed: {_last_line(out)}")
        print(f"started {args.name} from {image}, data in the volume {args.name}-data")
    if args.wait and not _wait_healthy(url, args.wait):
        return _err(f"{args.name} runs but {url}/healthz did not answer 200 within {args.wait:.0f}s; "
                    f"see `llm-observe logs --name {args.name}`")
    where = "on every interface" if args.bind in ("0.0.0.0", "::") else f"on {args.bind} only"
    line = f"API and console {url} ({where})"
    if not args.no_stack:
        line += (f"  Grafana {_host_url(args, args.grafana_port)}  OTLP gRPC :{args.otlp_port}  "
                 f"OTLP/HTTP :{args.otlp_http_port}  Prometheus :{args.prometheus_port}")
    print(line)
    secrets = "the console admin password and the first API key" + ("" if args.no_stack else
                                                                        " (and Grafana's admin password)")
    print(f"first start: {secrets} are printed once, in `llm-observe logs --name {args.name}`")
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
    out = _run(docker, "stop", "--time", str(args.timeout), args.name, timeout=args.timeout + 60)
    if out.returncode != 0:
        return _err(f"docker stop {args.name} failed: {_last_line(out)}")
    print(f"stopped {args.name} (data kept in the volume {args.name}-data)")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    docker, _state, code = _existing(args, f"{args.name}: no such container")
    if docker is None:
        return code
    command = [docker, "logs"]
    if args.follow:
        command.append("--follow")
    if args.tail is not None:
        command += ["--tail", str(args.tail)]
    # Straight to this terminal: the log can be long, and --follow runs until Ctrl-C.
    return subprocess.call([*command, args.name])


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


# -- llm-observe wal ----------------------------------------------------------------------


def _when(epoch: float | None) -> str:
    if not epoch:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _wal_for(args: argparse.Namespace):
    """The WriteAheadLog named by --wal or the SDK's configuration, or None when there is none."""
    from pathlib import Path

    from instrumentation_sdk._config import config_from_env
    from instrumentation_sdk._wal import WriteAheadLog

    path = Path(args.wal) if args.wal else config_from_env().resolved_wal_path()
    return WriteAheadLog(path), path


def cmd_wal_status(args: argparse.Namespace) -> int:
    from instrumentation_sdk import _spill
    from instrumentation_sdk._config import config_from_env

    wal, path = _wal_for(args)
    report: dict = {"wal": str(path), "destinations": [], "dead_letters": 0, "dead_letter_file": str(wal.dead_path),
                    "spill_files": []}
    try:
        if path.exists():
            report["destinations"] = wal.summary()
        report["dead_letters"] = wal.dead_count()
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: say so
        return _err(f"cannot read {path}: {exc}")
    finally:
        wal.close()
    directory, why = _spill.spill_directory(config_from_env().spill_dir)
    if directory is not None:
        report["spill_files"] = _spill.describe(directory, _spill.spill_key(path))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"WAL {path}" + ("" if path.exists() else " (none yet)"))
    for dest in report["destinations"]:
        print(f"  {dest['dest'] or '(no destination)'}: {dest['rows']} span(s) waiting, {dest['leased'] or 0} being "
              f"sent now, oldest {_when(dest['oldest'])}, most server errors for one span {dest['max_attempts']}")
    print(f"dead letters: {report['dead_letters']} in {wal.dead_path}"
          + ("  (`llm-observe wal list`)" if report["dead_letters"] else ""))
    if directory is None:
        print(f"spill files: off ({why})")
    else:
        orphans = [f for f in report["spill_files"] if not f["alive"]]
        print(f"spill files in {directory}: {len(report['spill_files'])} ({len(orphans)} of ended processes, "
              f"{sum(f['pending'] or 0 for f in orphans)} span(s) to recover: the next process using this WAL "
              f"does it, or `llm-observe wal recover`)")
    return 0


def cmd_wal_list(args: argparse.Namespace) -> int:
    wal, path = _wal_for(args)
    if not wal.dead_path.exists():
        print(f"no dead letters ({wal.dead_path} does not exist)")
        return 0
    try:
        rows = wal.dead_rows(limit=args.limit)
    except Exception as exc:  # noqa: BLE001
        return _err(f"cannot read {wal.dead_path}: {exc}")
    finally:
        wal.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no dead letters in {wal.dead_path}")
        return 0
    print(f"{'span_id':<34} {'set aside (UTC)':<21} {'tries':>5}  reason")
    for row in rows:
        print(f"{str(row['span_id']):<34} {_when(row['dead_at']):<21} {row['attempts']:>5}  {row['reason']}")
    return 0


def cmd_wal_replay(args: argparse.Namespace) -> int:
    wal, path = _wal_for(args)
    if not wal.dead_path.exists():
        print(f"no dead letters ({wal.dead_path} does not exist)")
        return 1 if args.span_id else 0
    try:
        wanted = args.span_id or None
        if wanted:
            missing = set(wanted) - {row["span_id"] for row in wal.dead_rows(span_ids=wanted)}
            if missing:
                return _err(f"not among the dead letters: {', '.join(sorted(missing))}")
        moved = wal.dead_replay(span_ids=wanted)
    except Exception as exc:  # noqa: BLE001
        return _err(f"cannot move dead letters back to {path}: {exc}")
    finally:
        wal.close()
    print(f"moved {moved} dead letter(s) back to {path}: the next process that uses it sends them"
          if moved else "no dead letters to replay")
    return 0


def cmd_wal_purge(args: argparse.Namespace) -> int:
    if not (args.all or args.span_id or args.older_than is not None):
        return _err("say what to delete: --all, --span-id ID (repeatable) or --older-than DAYS")
    wal, path = _wal_for(args)
    if not wal.dead_path.exists():
        print(f"no dead letters ({wal.dead_path} does not exist)")
        return 0
    try:
        older = time.time() - args.older_than * 86400 if args.older_than is not None else None
        removed = wal.dead_purge(span_ids=args.span_id or None, older_than=older)
    except Exception as exc:  # noqa: BLE001
        return _err(f"cannot delete from {wal.dead_path}: {exc}")
    finally:
        wal.close()
    print(f"deleted {removed} dead letter(s) from {wal.dead_path}")
    return 0


def cmd_wal_recover(args: argparse.Namespace) -> int:
    """Spill files of ended processes -> the WAL, for when no process will use this WAL path again soon."""
    from dataclasses import replace

    from instrumentation_sdk._config import config_from_env
    from instrumentation_sdk._reporter import SpanReporter

    cfg = config_from_env()
    if args.wal:
        cfg = replace(cfg, wal_path=args.wal)
    reporter = SpanReporter(wal_path=cfg.wal_path, url=cfg.url or "http://unset.invalid")
    try:
        reporter._adopt_orphans(reporter.config)
    except Exception as exc:  # noqa: BLE001
        return _err(f"cannot recover the spill files: {exc}")
    finally:
        if reporter._wal is not None:
            reporter._wal.close()
    count = reporter.stats["spill_recovered"]
    print(f"recovered {count} span(s) into {cfg.resolved_wal_path()}" if count else "no spill files to recover")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-observe", description="Run and check an llm-observe appliance.")
    sub = parser.add_subparsers(dest="command", required=True)

    def name_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--name", default=DEFAULT_NAME, help=f"container name (default {DEFAULT_NAME})")

    def container_flags(p: argparse.ArgumentParser) -> None:
        # The flags of 1.8.1, on start, status and stop (status/stop only use --name).
        name_flag(p)
        p.add_argument("--image", default=os.environ.get("LLM_OBSERVE_IMAGE", DEFAULT_IMAGE))
        p.add_argument("--tag", default=DEFAULT_TAG)
        p.add_argument("--api-port", type=int, default=8002, help="host port of the API and console (8002)")
        p.add_argument("--grafana-port", type=int, default=3002, help="host port of Grafana (3002)")
        p.add_argument("--otlp-port", type=int, default=4317, help="host port of Tempo's OTLP gRPC (4317)")
        p.add_argument("--otlp-http-port", type=int, default=4318, help="host port of Tempo's OTLP/HTTP (4318)")
        p.add_argument("--prometheus-port", type=int, default=9090, help="host port of Prometheus (9090)")

    start = sub.add_parser("start", help="start the all-in-one appliance container (docker)")
    container_flags(start)
    start.add_argument("--bind", default=LOOPBACK, metavar="ADDRESS",
                       help="host address the ports are published on (default 127.0.0.1: this machine only; "
                            "Prometheus and Tempo have no authentication)")
    start.add_argument("--publish-all", action="store_true",
                       help="publish on every interface (--bind 0.0.0.0); set -e ALLOWED_HOSTS=your.host too")
    start.add_argument("--no-stack", action="store_true",
                       help="without Grafana, Prometheus and Tempo (WITH_OBSERVABILITY_STACK=0): only the API port")
    start.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE",
                       help="environment of a new container (repeatable), e.g. ALLOWED_HOSTS=observe.example.com")
    start.add_argument("--wait", type=float, default=180.0, help="seconds to wait for /healthz (0: do not wait)")
    start.set_defaults(func=cmd_start)

    status = sub.add_parser("status", help="is the appliance container running?")
    container_flags(status)
    status.set_defaults(func=cmd_status)

    stop = sub.add_parser("stop", help="stop the appliance container (data is kept)")
    container_flags(stop)
    stop.add_argument("--timeout", type=int, default=STOP_TIMEOUT,
                      help=f"seconds to wait for a clean stop before Docker kills it (default {STOP_TIMEOUT})")
    stop.set_defaults(func=cmd_stop)

    logs = sub.add_parser("logs", help="the appliance container's log (first-start credentials are in it)")
    name_flag(logs)
    logs.add_argument("-f", "--follow", action="store_true")
    logs.add_argument("--tail", type=int, default=None, metavar="N", help="only the last N lines")
    logs.set_defaults(func=cmd_logs)

    chk = sub.add_parser("check", help="verify LLM_OBSERVE_URL and LLM_OBSERVE_API_KEY against the appliance "
                                       "(with the Kafka transport: the broker and its spans topic too)")
    chk.add_argument("--url", default=None)
    chk.add_argument("--api-key", default=None)
    chk.add_argument("--timeout", type=float, default=10.0)
    chk.set_defaults(func=cmd_check)

    wal = sub.add_parser("wal", help="the SDK's local files: WAL, dead letters, spill files")
    wal_sub = wal.add_subparsers(dest="wal_command", required=True)

    def wal_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--wal", default=None, help="the WAL file (default: LLM_OBSERVE_WAL_PATH or the SDK's default)")

    p = wal_sub.add_parser("status", help="spans waiting in the WAL, dead letters, spill files")
    wal_flag(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_wal_status)
    p = wal_sub.add_parser("list", help="the dead letters: span_id, when, attempts, reason")
    wal_flag(p)
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_wal_list)
    p = wal_sub.add_parser("replay", help="move dead letters back to the WAL, to be sent again")
    wal_flag(p)
    p.add_argument("--span-id", action="append", default=[], help="only this span (repeatable); default: all")
    p.set_defaults(func=cmd_wal_replay)
    p = wal_sub.add_parser("purge", help="delete dead letters")
    wal_flag(p)
    p.add_argument("--all", action="store_true")
    p.add_argument("--span-id", action="append", default=[])
    p.add_argument("--older-than", type=float, default=None, metavar="DAYS")
    p.set_defaults(func=cmd_wal_purge)
    p = wal_sub.add_parser("recover", help="put the spans of ended processes' spill files into the WAL")
    wal_flag(p)
    p.set_defaults(func=cmd_wal_recover)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
