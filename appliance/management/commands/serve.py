"""`manage.py serve`: the whole appliance in the foreground under one supervisor.

Prepares the database (migrations, config, first-start credentials), then runs
the web server, a Celery worker and Celery beat (and the Kafka consumer when
Kafka is configured) as supervised child processes with prefixed output (see
appliance/supervisor.py): a child that dies is restarted, the embedded PostgreSQL
and Valkey are watched and restarted too. Ctrl-C or SIGTERM stops the children
first and the embedded servers last, and exits 0.
"""

import os
import sys
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand

from appliance import embedded
from appliance.env import env_int, env_str, is_loopback
from appliance.supervisor import ProcessSpec, Supervisor, Watchdog, state_file

GRACEFUL_TIMEOUT = 20  # gunicorn drains requests this long on SIGTERM


def _control_socket() -> list[str]:
    """gunicorn's control socket in DATA_DIR, not the one every instance on the machine shares in ~."""
    path = Path(settings.DATA_DIR) / "run" / "gunicorn.ctl"
    if len(str(path).encode()) >= 100:  # sun_path holds 108 bytes
        return ["--no-control-socket"]
    path.parent.mkdir(parents=True, exist_ok=True)
    return ["--control-socket", str(path)]


def _watchdogs(env: dict) -> list[Watchdog]:
    """The embedded servers: watched and started again when they die, on their old port when it is free."""
    dogs = []
    for name, server in embedded.instances().items():
        server.adopt()  # left running by a serve that was SIGKILLed: ours to stop now
        if name == "postgres":
            dogs.append(Watchdog("postgres", alive=lambda s=server: s.running_port() is not None,
                                 revive=lambda s=server: _changed(env, "DATABASE_URL", s.ensure_running().url)))
        else:
            dogs.append(Watchdog(name, alive=server.running,
                                 revive=lambda s=server: _changed(env, "REDIS_URL", s.ensure_running())))
    return dogs


def _changed(env: dict, name: str, value: str) -> dict | None:
    return None if env.get(name) == value else {name: value}


class Command(BaseCommand):
    help = "Run the appliance: migrate, load config, bootstrap, then web + worker + beat in the foreground."

    def add_arguments(self, parser):
        parser.add_argument("--bind", default=None, help="listen address (default: BIND_HOST, 127.0.0.1)")
        parser.add_argument("--web-workers", type=int, default=int(os.environ.get("WEB_WORKERS", "0")) or None)
        parser.add_argument("--no-worker", action="store_true", help="do not start Celery worker and beat")
        parser.add_argument("--skip-prepare", action="store_true", help="skip migrate/load_config/bootstrap")
        parser.add_argument("--no-consumer", action="store_true", help="do not start the Kafka consumer")

    def handle(self, *args, bind, web_workers, no_worker, skip_prepare, no_consumer, **options):
        bind = bind or settings.BIND_HOST
        if not skip_prepare:
            self.stdout.write("llm-observe: applying migrations ...")
            call_command("migrate", interactive=False, verbosity=0)
            call_command("load_config")
            call_command("bootstrap")
            call_command("maintain_partitions")

        python = sys.executable
        workers = web_workers or max(2, (os.cpu_count() or 1) * 2)
        env = {
            **os.environ,
            "DATA_DIR": str(settings.DATA_DIR),
            "DATABASE_URL": settings.DATABASE_URL,
            "REDIS_URL": settings.REDIS_URL,
            "PYTHONUNBUFFERED": "1",
            # The children decide from it whether /metrics needs a token (settings.BINDS_BEYOND_LOOPBACK).
            "BIND_HOST": bind,
        }
        # Every child writes its Prometheus samples here and /metrics sums the files; those of a
        # previous run would be counted again, so they go (counters restart at zero, as Prometheus expects).
        metrics_dir = Path(settings.PROMETHEUS_MULTIPROC_DIR)
        metrics_dir.mkdir(parents=True, exist_ok=True)
        for stale in metrics_dir.glob("*.db"):
            stale.unlink(missing_ok=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        cwd = str(settings.BASE_DIR)
        specs = []
        web = [
            python, "-m", "gunicorn", "appliance.wsgi:application",
            "--bind", f"{bind}:{settings.PORT}", "--workers", str(workers),
            "--worker-class", os.environ.get("WEB_WORKER_CLASS", "gthread"),
            "--threads", os.environ.get("WEB_THREADS", "4"), "--keep-alive", "30",
            "--graceful-timeout", str(GRACEFUL_TIMEOUT), "--timeout", "60", "--access-logfile", "-",
            "--limit-request-line", "8190", *_control_socket(),
        ]
        specs.append(ProcessSpec("web", web, env, cwd, grace=GRACEFUL_TIMEOUT + 10))
        if not no_worker:
            concurrency = env_int("WORKER_CONCURRENCY", 2, minimum=1, maximum=256)
            # Each worker process embeds with its share of the cores (unless EMBEDDING_THREADS says).
            from ingest.services.embeddings import available_cores

            worker_env = {"EMBEDDING_THREADS": str(max(1, available_cores() // concurrency)), **env}
            # A warm shutdown finishes the task in hand; an embedding batch takes seconds, not minutes.
            specs.append(ProcessSpec("worker", [
                python, "-m", "celery", "-A", "appliance", "worker", "--loglevel", "INFO",
                "--concurrency", str(concurrency), "--without-gossip", "--without-mingle",
            ], worker_env, cwd, grace=60))
            specs.append(ProcessSpec("beat", [
                python, "-m", "celery", "-A", "appliance", "beat", "--loglevel", "INFO",
                "--schedule", str(settings.DATA_DIR / "celerybeat-schedule"),
            ], env, cwd, grace=15))
        if settings.WITH_KAFKA and not no_consumer:
            # The consumer creates the topics when missing and waits for the broker if it is not up yet.
            specs.append(ProcessSpec("consumer", [python, "manage.py", "run_consumer", "spans"], env, cwd,
                                     grace=settings.KAFKA_SESSION_TIMEOUT_MS / 1000 + 10))
        self.stdout.write(f"llm-observe: serving on http://{bind}:{settings.PORT} (data in {settings.DATA_DIR}); Ctrl-C stops")
        if not is_loopback(bind) and not env_str("METRICS_AUTH_TOKEN"):
            self.stdout.write("llm-observe: reachable beyond this machine, /metrics needs `Authorization: Bearer "
                              "<METRICS_AUTH_TOKEN>` (unless set, generated into DATA_DIR/secrets/metrics_token)")
        supervisor = Supervisor(
            specs, state_file=state_file(settings.DATA_DIR), watchdogs=_watchdogs(env),
            max_retries=env_int("SUPERVISOR_MAX_RETRIES", 6, minimum=1, maximum=1000),
            stable_seconds=env_int("SUPERVISOR_STABLE_SECONDS", 10, minimum=1, maximum=3600),
            out=self.stdout._out,
        )
        code = supervisor.run()
        # The children got DATABASE_URL / REDIS_URL: the embedded servers are this process's alone,
        # watched above and stopped after the children, at exit.
        sys.exit(code)
