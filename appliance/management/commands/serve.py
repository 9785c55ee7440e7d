"""`manage.py serve`: the whole appliance in the foreground under one supervisor.

Prepares the database (migrations, config, first-start credentials), then runs
the web server, a Celery worker and Celery beat (and the Kafka consumer when
Kafka is configured) as child processes with prefixed output. Ctrl-C or SIGTERM
stops them all; the embedded PostgreSQL / Valkey started by this process stop last.
"""

import os
import shlex
import sys
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand

from appliance.env import env_int


class Command(BaseCommand):
    help = "Run the appliance: migrate, load config, bootstrap, then web + worker + beat in the foreground."

    def add_arguments(self, parser):
        parser.add_argument("--bind", default=os.environ.get("BIND_HOST", "127.0.0.1"), help="listen address")
        parser.add_argument("--web-workers", type=int, default=int(os.environ.get("WEB_WORKERS", "0")) or None)
        parser.add_argument("--no-worker", action="store_true", help="do not start Celery worker and beat")
        parser.add_argument("--skip-prepare", action="store_true", help="skip migrate/load_config/bootstrap")
        parser.add_argument("--no-consumer", action="store_true", help="do not start the Kafka consumer")

    def handle(self, *args, bind, web_workers, no_worker, skip_prepare, no_consumer, **options):
        from honcho.manager import Manager

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
        }
        # Every child writes its Prometheus samples here and /metrics sums the files; those of a
        # previous run would be counted again, so they go (counters restart at zero, as Prometheus expects).
        metrics_dir = Path(settings.PROMETHEUS_MULTIPROC_DIR)
        metrics_dir.mkdir(parents=True, exist_ok=True)
        for stale in metrics_dir.glob("*.db"):
            stale.unlink(missing_ok=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        manager = Manager()
        web = [
            python, "-m", "gunicorn", "appliance.wsgi:application",
            "--bind", f"{bind}:{settings.PORT}", "--workers", str(workers),
            "--worker-class", os.environ.get("WEB_WORKER_CLASS", "gthread"),
            "--threads", os.environ.get("WEB_THREADS", "4"), "--keep-alive", "30",
            "--graceful-timeout", "20", "--timeout", "60", "--access-logfile", "-",
            "--limit-request-line", "8190",
        ]
        manager.add_process("web", shlex.join(web), env=env, cwd=str(settings.BASE_DIR))
        if not no_worker:
            concurrency = env_int("WORKER_CONCURRENCY", 2, minimum=1, maximum=256)
            # Each worker process embeds with its share of the cores (unless EMBEDDING_THREADS says).
            from ingest.services.embeddings import available_cores

            worker_env = {"EMBEDDING_THREADS": str(max(1, available_cores() // concurrency)), **env}
            manager.add_process("worker", shlex.join([
                python, "-m", "celery", "-A", "appliance", "worker", "--loglevel", "INFO",
                "--concurrency", str(concurrency), "--without-gossip", "--without-mingle",
            ]), env=worker_env, cwd=str(settings.BASE_DIR))
            manager.add_process("beat", shlex.join([
                python, "-m", "celery", "-A", "appliance", "beat", "--loglevel", "INFO",
                "--schedule", str(settings.DATA_DIR / "celerybeat-schedule"),
            ]), env=env, cwd=str(settings.BASE_DIR))
        if settings.WITH_KAFKA and not no_consumer:
            # The consumer creates the topics when missing and waits for the broker if it is not up yet.
            manager.add_process("consumer", shlex.join([python, "manage.py", "run_consumer", "spans"]),
                                env=env, cwd=str(settings.BASE_DIR))
        self.stdout.write(f"llm-observe: serving on http://{bind}:{settings.PORT} (data in {settings.DATA_DIR}); Ctrl-C stops")
        manager.loop()
        sys.exit(manager.returncode or 0)
