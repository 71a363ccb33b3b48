"""The Celery app and its settings: at-least-once delivery that the output turns into exactly-once.

    fbas-pipeline worker --triton gpu1:8001       # a supervised worker; FBAS_BROKER, FBAS_TASK_KEY set
    python -m celery -A workers.app worker -Q fbas --concurrency 2    # the same, unsupervised: settings from
                                                  # FBAS_* variables; restart it when it exits with code 75

Settings (Celery ``userguide/tasks.rst``, ``configuration.rst``, kombu's Redis transport):

* ``task_serializer = msgpack``, ``accept_content = [msgpack, json]``: a pickle message is
  refused before it is deserialized (kombu raises ``ContentDisallowed``; the worker logs
  and drops it).
* ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only after
  the batch is committed; a worker child that dies mid-batch (``kill -9``, OOM) puts it back.
* ``worker_prefetch_multiplier = 1`` and ``worker_disable_prefetch``: a worker takes a batch
  only when a process is free, so no batch waits behind a busy one.
* ``visibility_timeout`` (seconds) above the task's hard time limit: kombu redelivers an
  unacknowledged message only after it, so a running batch is not handed out twice unless a
  whole worker died.
* no result backend (``task_ignore_result``): job progress lives in ``workers.jobstate``.

The settings come from one ``FbasConfig`` (``configure(cfg)``); importing this module builds
that config from ``FBAS_*`` variables, so ``celery -A workers.app`` and worker children see
the same values.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

from celery import Celery

from core.config import HARD_LIMIT_MARGIN, FbasConfig, apply_env, visibility_seconds
from core.envs import read_env
from core.redact import redact_url
from workers.metrics import install as install_metrics
from workers.watchdog import install as install_watchdog

logger = logging.getLogger(__name__)

__all__ = ["app", "QUEUE", "TASK_NAME", "celery_settings", "configure", "current_config", "producer_app"]

QUEUE = "fbas"
TASK_NAME = "fbas.embed_batch"

_config: FbasConfig | None = None


def celery_settings(cfg: FbasConfig) -> dict[str, Any]:
    """Celery settings for a config (see the module docstring for why each is set)."""
    q = cfg.queue
    settings: dict[str, Any] = {
        "broker_url": q.broker or "redis://127.0.0.1:6379/0",
        "broker_transport_options": {
            "visibility_timeout": visibility_seconds(q),
            "socket_keepalive": True,
            "health_check_interval": 30,
        },
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "task_serializer": "msgpack",
        "accept_content": ["msgpack", "json"],
        "result_accept_content": ["msgpack", "json"],
        "result_serializer": "json",
        "event_serializer": "json",
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_disable_prefetch": True,
        "task_soft_time_limit": q.task_time_limit,
        "task_time_limit": q.task_time_limit + HARD_LIMIT_MARGIN,
        "task_default_queue": QUEUE,
        "task_create_missing_queues": True,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "worker_enable_remote_control": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_pool_limit": 4,
        "imports": ["workers.task"],
    }
    if (q.broker or "").startswith("rediss://") and "ssl_cert_reqs" not in (q.broker or ""):
        settings["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return settings


def configure(cfg: FbasConfig) -> Celery:
    """Apply ``cfg`` to the app (before a worker starts or a producer sends)."""
    global _config
    q = cfg.queue
    if visibility_seconds(q) <= q.task_time_limit + HARD_LIMIT_MARGIN:
        logger.warning(
            "visibility_timeout %.0fs is not above the hard time limit %.0fs: a slow batch may be "
            "delivered twice (harmless for the output, wasteful)",
            visibility_seconds(q),
            q.task_time_limit + HARD_LIMIT_MARGIN,
        )
    app.conf.update(celery_settings(cfg))
    _config = cfg
    logger.debug("celery app configured for broker %s", redact_url(q.broker))
    return app


def producer_app(cfg: FbasConfig) -> Celery:
    """A separate Celery app for a producer (its own connection pools for ``cfg.queue.broker``); ``close()`` it
    when done. Producers never run tasks, so the task module is not imported."""
    settings = celery_settings(cfg)
    settings.pop("imports")
    producer = Celery("fbas-producer", set_as_current=False)
    producer.conf.update(settings)
    return producer


def current_config() -> FbasConfig:
    """The config this process's app was configured with (from ``FBAS_*`` variables by default)."""
    global _config
    if _config is None:
        _config = apply_env(FbasConfig(), read_env())
    return _config


app = Celery("fbas")
configure(current_config())
install_watchdog()  # in a worker's main process only: the signal fires when a worker is ready
install_metrics(lambda: current_config().queue)  # the same: serves the pool's metrics
