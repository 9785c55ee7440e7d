"""Each worker writes a short-lived key every few seconds; /healthz looks for one."""

from __future__ import annotations

import socket
import threading

import redis
from celery.signals import worker_ready, worker_shutdown
from django.conf import settings

from appliance.health import WORKER_KEY_PREFIX

INTERVAL = 5
TTL = 20
_stop = threading.Event()


def _beat(key: str) -> None:
    client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    while not _stop.is_set():
        try:
            client.set(key, "1", ex=TTL)
        except redis.RedisError:
            pass  # the broker being away is reported by /healthz's broker check
        _stop.wait(INTERVAL)
    try:
        client.delete(key)
    except redis.RedisError:
        pass


@worker_ready.connect
def _start(sender=None, **kwargs):
    hostname = getattr(sender, "hostname", None) or socket.gethostname()
    threading.Thread(target=_beat, args=(WORKER_KEY_PREFIX + hostname,), daemon=True, name="heartbeat").start()


@worker_shutdown.connect
def _stop_beat(**kwargs):
    _stop.set()
