"""Bad configuration stops start-up with a message naming the variable (settings imported in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETUP = ("import django, os; os.environ['DJANGO_SETTINGS_MODULE'] = 'appliance.settings'; django.setup(); "
         "from django.conf import settings as s; ")
# Variables the settings module reads; cleared so the developer's own environment cannot leak in.
SETTINGS_VARS = [
    "DATA_DIR", "DEPLOYMENT_ENV", "DEBUG", "PORT", "RETENTION_DAYS", "PARTITIONS_AHEAD_DAYS", "SECRET_KEY",
    "ALLOWED_HOSTS", "CSRF_TRUSTED_ORIGINS", "DATABASE_URL", "POSTGRES_URL", "REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS",
    "WITH_KAFKA", "DB_CONN_MAX_AGE", "INGEST_MAX_SPANS", "INGEST_MAX_BYTES", "CONFIG_REFRESH_SECONDS", "LOG_LEVEL",
    "SECURE_COOKIES", "DJANGO_SETTINGS_MODULE", "BIND_HOST", "METRICS_AUTH_TOKEN", "SECURE_SSL_REDIRECT",
    "SECURE_HSTS_SECONDS", "SECURE_HSTS_INCLUDE_SUBDOMAINS", "SECURE_HSTS_PRELOAD", "TRUST_X_FORWARDED_PROTO",
    "DJANGO_ALLOW_ASYNC_UNSAFE",  # another test's setting, which `check --deploy` rightly refuses
]
DUMMY_DB = "postgresql://user:pw@127.0.0.1:1/llmo_dummy"
DUMMY_REDIS = "redis://127.0.0.1:1/0"


def run_settings(tmp_path: Path, code: str = "print('ok')", **env_overrides: str | None):
    env = dict(os.environ)
    for name in SETTINGS_VARS:
        env.pop(name, None)
        env.pop(f"{name}_FILE", None)
    env.update(DATA_DIR=str(tmp_path / "data"), DATABASE_URL=DUMMY_DB, REDIS_URL=DUMMY_REDIS)
    for name, value in env_overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return subprocess.run([sys.executable, "-c", SETUP + code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_good_environment_starts(tmp_path):
    proc = run_settings(tmp_path, "print(s.PORT, s.RETENTION_DAYS, s.DEPLOYMENT_ENV, s.DATABASES['default']['NAME'])")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["8000", "30", "dev", "llmo_dummy"]


BAD = [
    ({"PORT": "abc"}, "PORT"),
    ({"PORT": "70000"}, "PORT"),
    ({"PORT": "0"}, "PORT"),
    ({"RETENTION_DAYS": "0"}, "RETENTION_DAYS"),
    ({"DEPLOYMENT_ENV": "prod"}, "DEPLOYMENT_ENV"),
    ({"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL"),
    ({"DATABASE_URL": None, "POSTGRES_URL": "mysql://x/y"}, "POSTGRES_URL"),
    ({"REDIS_URL": "http://localhost:6379"}, "REDIS_URL"),
    ({"SECRET_KEY": "short"}, "SECRET_KEY"),
    ({"SECRET_KEY_FILE": "/nonexistent/secret"}, "SECRET_KEY_FILE"),
    ({"DEBUG": "maybe"}, "DEBUG"),
    ({"DEPLOYMENT_ENV": "production"}, "ALLOWED_HOSTS"),
    ({"WITH_KAFKA": "true"}, "KAFKA_BOOTSTRAP_SERVERS"),
]


@pytest.mark.parametrize("env, variable", BAD, ids=[f"{k}-{v}" for k, v in (
    (next(iter(e)), e[next(iter(e))]) for e, _ in BAD)])
def test_bad_value_stops_start_up_naming_the_variable(tmp_path, env, variable):
    proc = run_settings(tmp_path, **env)
    assert proc.returncode != 0, proc.stdout
    assert "llm-observe configuration error" in proc.stderr
    assert variable in proc.stderr
    assert "Traceback" not in proc.stderr  # a clear message, not a stack trace
    assert "ok" not in proc.stdout


def test_bad_configuration_exits_1_with_the_message_and_no_traceback(tmp_path):
    proc = run_settings(tmp_path, PORT="abc")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "llm-observe configuration error: PORT='abc' is not an integer"


def test_production_with_allowed_hosts_starts(tmp_path):
    proc = run_settings(tmp_path, "print(s.ALLOWED_HOSTS, s.SESSION_COOKIE_SECURE)",
                        DEPLOYMENT_ENV="production", ALLOWED_HOSTS="obs.example.com, 10.0.0.5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['obs.example.com', '10.0.0.5'] True"


@pytest.mark.parametrize("host, protected", [("127.0.0.1", False), ("localhost", False), ("::1", False),
                                             ("0.0.0.0", True), ("10.0.0.5", True), ("::", True)])
def test_metrics_need_a_token_whenever_the_appliance_listens_beyond_loopback(tmp_path, host, protected):
    code = "print(repr(s.METRICS_AUTH_TOKEN))"
    proc = run_settings(tmp_path, code, BIND_HOST=host)
    assert proc.returncode == 0, proc.stderr
    token_file = tmp_path / "data" / "secrets" / "metrics_token"
    if not protected:
        assert proc.stdout.strip() == "None" and not token_file.exists()
        return
    token = token_file.read_text()
    assert proc.stdout.strip() == repr(token) and len(token) >= 50
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    assert run_settings(tmp_path, code, BIND_HOST=host).stdout == proc.stdout  # kept across starts
    given = run_settings(tmp_path, code, BIND_HOST=host, METRICS_AUTH_TOKEN="mine-" + "t" * 30)
    assert given.stdout.strip() == repr("mine-" + "t" * 30)


def test_production_is_https_only_unless_turned_off_and_check_deploy_is_clean(tmp_path):
    prod = {"DEPLOYMENT_ENV": "production", "ALLOWED_HOSTS": "obs.example.com"}
    code = "print(s.SECURE_SSL_REDIRECT, s.SECURE_HSTS_SECONDS, s.SECURE_HSTS_INCLUDE_SUBDOMAINS, s.SECURE_REDIRECT_EXEMPT)"
    proc = run_settings(tmp_path, code, **prod)
    assert proc.stdout.strip() == "True 31536000 True ['^healthz$', '^metrics$']", proc.stderr
    off = run_settings(tmp_path, code, SECURE_SSL_REDIRECT="0", SECURE_HSTS_SECONDS="0", **prod)
    assert off.stdout.split()[:2] == ["False", "0"], off.stderr
    dev = run_settings(tmp_path, "print(getattr(s, 'SECURE_SSL_REDIRECT', False), s.SECURE_HSTS_SECONDS)")
    assert dev.stdout.split() == ["False", "0"]
    for extra in ({}, {"SECURE_SSL_REDIRECT": "0", "SECURE_HSTS_SECONDS": "0"}):
        env = dict(os.environ)
        for name in SETTINGS_VARS:
            env.pop(name, None)
        env.update(DATA_DIR=str(tmp_path / "data"), DATABASE_URL=DUMMY_DB, REDIS_URL=DUMMY_REDIS, **prod, **extra)
        check = subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "System check identified no issues" in check.stdout


def test_postgres_url_is_an_alias_of_database_url(tmp_path):
    code = "d = s.DATABASES['default']; print(d['NAME'], d['HOST'], d['PORT'], d['USER'], s.EMBEDDED_DATABASE)"
    proc = run_settings(tmp_path, code, DATABASE_URL=None, POSTGRES_URL="postgres://bob:pw@db.internal:6543/obs")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["obs", "db.internal", "6543", "bob", "False"]
    # DATABASE_URL wins when both are set
    proc = run_settings(tmp_path, code, POSTGRES_URL="postgres://bob:pw@db.internal:6543/obs")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "llmo_dummy"


def test_missing_database_name_names_the_variable_that_was_used(tmp_path):
    proc = run_settings(tmp_path, DATABASE_URL=None, POSTGRES_URL="postgresql://bob:pw@db.internal:5432")
    assert proc.returncode != 0
    assert "POSTGRES_URL" in proc.stderr


def test_secret_key_file_wins_over_secret_key(tmp_path):
    secret_file = tmp_path / "secret_key"
    secret_file.write_text("FILEsecret-" + "f" * 40 + "\n", encoding="utf-8")
    code = "print(len(s.SECRET_KEY), s.SECRET_KEY[:4])"
    proc = run_settings(tmp_path, code, SECRET_KEY="ENVsecret-" + "e" * 40, SECRET_KEY_FILE=str(secret_file))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(len("FILEsecret-") + 40), "FILE"]  # stripped of its newline
    proc = run_settings(tmp_path, code, SECRET_KEY="ENVsecret-" + "e" * 40)
    assert proc.stdout.split() == [str(len("ENVsecret-") + 40), "ENVs"]


def test_short_secret_key_file_is_refused(tmp_path):
    secret_file = tmp_path / "secret_key"
    secret_file.write_text("tiny", encoding="utf-8")
    proc = run_settings(tmp_path, SECRET_KEY_FILE=str(secret_file))
    assert proc.returncode != 0 and "SECRET_KEY" in proc.stderr


def test_generated_secret_key_is_kept_across_starts(tmp_path):
    code = "print(s.SECRET_KEY)"
    first = run_settings(tmp_path, code)
    second = run_settings(tmp_path, code)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert len(first.stdout.strip()) >= 50 and first.stdout == second.stdout
    key_file = tmp_path / "data" / "secrets" / "secret_key"
    assert key_file.exists() and oct(key_file.stat().st_mode & 0o777) == "0o600"


def test_embedded_postgres_shared_buffers_default_and_override(monkeypatch, db):
    from django.db import connection

    from appliance.embedded import ConfigError, shared_buffers

    monkeypatch.delenv("EMBEDDED_PG_SHARED_BUFFERS", raising=False)
    default = shared_buffers()
    megabytes = int(default.removesuffix("MB"))
    assert 128 <= megabytes <= 8192
    with connection.cursor() as cur:  # the server the tests run on was started with it
        cur.execute("SELECT setting::bigint * 8192 / 1048576 FROM pg_settings WHERE name = 'shared_buffers'")
        assert cur.fetchone()[0] == megabytes
    monkeypatch.setenv("EMBEDDED_PG_SHARED_BUFFERS", "2GB")
    assert shared_buffers() == "2GB"
    monkeypatch.setenv("EMBEDDED_PG_SHARED_BUFFERS", "lots")
    with pytest.raises(ConfigError, match="EMBEDDED_PG_SHARED_BUFFERS"):
        shared_buffers()
