"""Transactional outbox: rows written with the job, published to the broker by a relay.

No job is lost if the API dies between commit and publish (the relay finds
the row later), and none is published for a transaction that rolled back.
Publishing twice is harmless: the worker claims a job only while it is queued.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import session_scope
from app.tables import OutboxMessage, utcnow

log = logging.getLogger("modelpress.outbox")
BATCH = 100


def enqueue(session: Session, *, task: str, object_id: str, queue: str = "cpu", priority: int = 5) -> OutboxMessage:
    message = OutboxMessage(task=task, object_id=object_id, queue=queue, priority=priority)
    session.add(message)
    session.flush()
    return message


def publish(message: OutboxMessage) -> None:
    from app.queue import get_celery

    app = get_celery()
    # Our priority is 0..9 with 9 the most urgent (as AMQP); Redis' priority emulation runs 0 first.
    priority = message.priority
    if app.conf.broker_url.startswith(("redis", "rediss")):
        priority = 9 - priority
    app.send_task(message.task, args=[message.object_id], queue=message.queue, priority=priority)


def relay_once(min_age_s: float = 0.0) -> int:
    """Publish unsent outbox rows; returns how many were published."""
    sent = 0
    with session_scope() as session:
        query = (
            select(OutboxMessage)
            .where(OutboxMessage.published_at.is_(None))
            .where(OutboxMessage.created_at <= utcnow() - timedelta(seconds=min_age_s))
            .order_by(OutboxMessage.id)
            .limit(BATCH)
        )
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        for message in session.scalars(query):
            try:
                publish(message)
            except Exception as error:  # broker down: keep the row, try again later
                message.publish_attempts += 1
                log.warning("outbox publish failed for %s: %s", message.object_id, error)
                break
            message.published_at = utcnow()
            sent += 1
    return sent


def publish_now(message_id: int) -> None:
    """Publish right after the request's commit; a failure leaves the row for the relay."""
    with session_scope() as session:
        message = session.get(OutboxMessage, message_id)
        if message is None or message.published_at is not None:
            return
        try:
            publish(message)
        except Exception as error:
            message.publish_attempts += 1
            log.warning("outbox publish failed for %s, the relay will retry: %s", message.object_id, error)
            return
        message.published_at = utcnow()


class BackgroundLoop:
    """Runs `work` every `interval_s` seconds in a daemon thread until stopped."""

    def __init__(self, name: str, interval_s: float, work) -> None:  # type: ignore[no-untyped-def]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._interval, self._work = interval_s, work

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._work()
            except Exception:  # keep the loop alive; the next round retries
                log.exception("background loop %s failed", self._thread.name)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
