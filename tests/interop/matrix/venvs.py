"""One virtualenv per instrumentation library, cached under .data/interop-venvs by a hash of its lock.

`libs/<lib>/requirements.in` says what a user installs (the library at the version under test, the clients
unpinned); `libs/<lib>/requirements.txt` is that resolved to exact versions (`lock.sh`, uv pip compile), so
every run tests the same set and pip installs it with --no-deps, without resolving: pip's resolver
backtracks for many minutes over the OpenTelemetry contrib packages that traceloop-sdk and openlit pull in.
A venv is reused while its lock (and the Python that built it) are unchanged; a half-built one (no
`.complete` marker) is removed and built again. Builds run in parallel; pip's cache makes a rebuild on
the same machine mostly a matter of unpacking wheels.

    python -m tests.interop.matrix.venvs            # build (or find) every venv, print the timings
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIBS = HERE / "libs"
ROOT = HERE.parents[2]
VENV_ROOT = ROOT / ".data" / "interop-venvs"
NODE_DIR = ROOT / "tests" / "interop" / "node"
BUILDER_VERSION = "2"  # bump to force every venv to be rebuilt


def libraries() -> list[str]:
    return sorted(p.name for p in LIBS.iterdir() if (p / "requirements.txt").is_file())


def venv_path(lib: str) -> Path:
    requirements = (LIBS / lib / "requirements.txt").read_bytes()
    digest = hashlib.sha256(b"\0".join([BUILDER_VERSION.encode(), sys.version.encode(), requirements])).hexdigest()
    return VENV_ROOT / f"{lib}-{digest[:12]}"


def python_of(lib: str) -> Path:
    return venv_path(lib) / "bin" / "python"


def ensure_venv(lib: str) -> tuple[str, float, bool]:
    """(lib, seconds, built): the venv exists and is complete when this returns."""
    started = time.monotonic()
    path = venv_path(lib)
    VENV_ROOT.mkdir(parents=True, exist_ok=True)
    with open(VENV_ROOT / f"{lib}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second run waits for the first one's build instead of racing it
        if (path / ".complete").exists():
            return lib, time.monotonic() - started, False
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        log = VENV_ROOT / f"{lib}.pip.log"
        with open(log, "w") as out:
            result = subprocess.run(
                [str(path / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                 "--no-deps", "-r", str(LIBS / lib / "requirements.txt")], stdout=out, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            raise RuntimeError(f"pip install for {lib} failed:\n{log.read_text()[-4000:]}")
        freeze = subprocess.run([str(path / "bin" / "python"), "-m", "pip", "freeze"], capture_output=True,
                                text=True, check=True).stdout
        (path / "freeze.txt").write_text(freeze)
        (path / ".complete").write_text("ok\n")
        # older builds of the same library are dead weight
        for old in VENV_ROOT.glob(f"{lib}-*"):
            if old != path and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    return lib, time.monotonic() - started, True


def ensure_node() -> tuple[str, float, bool]:
    started = time.monotonic()
    lock_file = NODE_DIR / "package-lock.json"
    stamp = NODE_DIR / "node_modules" / ".lock-hash"
    digest = hashlib.sha256(lock_file.read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return "node", time.monotonic() - started, False
    subprocess.run(["npm", "ci", "--silent", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True)
    stamp.write_text(digest)
    return "node", time.monotonic() - started, True


def ensure_all(libs: list[str] | None = None, *, node: bool = True, workers: int = 4) -> dict[str, tuple[float, bool]]:
    libs = libraries() if libs is None else libs
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(ensure_venv, lib) for lib in libs]
        if node:
            futures.append(pool.submit(ensure_node))
        results = [f.result() for f in futures]
    return {name: (seconds, built) for name, seconds, built in results}


if __name__ == "__main__":
    t0 = time.monotonic()
    for name, (seconds, built) in ensure_all(sys.argv[1:] or None).items():
        print(f"{name:28s} {'built' if built else 'cached':6s} {seconds:6.1f} s")
    print(f"{'total':28s} {'':6s} {time.monotonic() - t0:6.1f} s")
