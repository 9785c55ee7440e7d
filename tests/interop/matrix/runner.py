"""Runs one library's script (its own venv, or node) against a given OTLP endpoint and the fake provider."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.interop.matrix.venvs import LIBS, NODE_DIR, python_of

SCRIPT_TIMEOUT = 180


def _command(lib: str) -> tuple[list[str], Path]:
    if lib == "node_openinference":
        return ["node", str(NODE_DIR / "openinference-openai.mjs")], NODE_DIR
    return [str(python_of(lib)), str(LIBS / lib / "run.py")], LIBS / lib


def run_library(lib: str, *, appliance_url: str, api_key: str, fake, service: str) -> subprocess.CompletedProcess:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SSL_CERT_FILE")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(APPLIANCE_URL=appliance_url, API_KEY=api_key, FAKE_OPENAI_URL=fake.openai_url,
               FAKE_ANTHROPIC_URL=fake.anthropic_url, SERVICE_NAME=service, PYTHONUNBUFFERED="1",
               # libraries that phone home or look for real keys must not: everything stays on this machine
               OPENAI_API_KEY="sk-fake", ANTHROPIC_API_KEY="sk-ant-fake", TRACELOOP_TELEMETRY="false",
               SCARF_NO_ANALYTICS="true", DO_NOT_TRACK="1", ANONYMIZED_TELEMETRY="false")
    command, cwd = _command(lib)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT)


def calls_of(result: subprocess.CompletedProcess) -> list[dict]:
    """The script's {"call": ...} lines, in order."""
    out = []
    for line in result.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict) and "call" in item:
                out.append(item)
    return out
