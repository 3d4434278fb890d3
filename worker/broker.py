"""kombu's Redis transport, surviving a Redis restart while a message is unacknowledged.

With kombu 5.x and redis-py 8, when Redis goes away while a worker holds an unacknowledged message, closing the
broken connection tries to put the message back on the queue through a client whose connection details were
already dropped, and the AttributeError it raises ends the worker's main process ("Unrecoverable error:
'NoneType' object has no attribute 'hostname'"). Here that restore gives up instead: a restarted Redis has lost
the message anyway, the pool process running the job goes on, and the reconciler sends the job again if its
attempt dies (worker/reconciler.py).
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis

log = logging.getLogger(__name__)


class _QoS(redis.QoS):
    def restore_unacked(self, client: Any = None) -> None:
        try:
            super().restore_unacked(client)  # type: ignore[no-untyped-call]
        except AttributeError as exc:  # the bug above; anything else is raised as before
            log.warning(
                "could not put %d unacknowledged message(s) back on the queue after losing Redis (%s); "
                "the reconciler sends their jobs again if needed",
                len(self._delivered),
                exc,
            )


class _Channel(redis.Channel):
    QoS = _QoS


class Transport(redis.Transport):
    """The redis:// transport with _QoS; selected by the broker_transport setting (worker/celery_app.py)."""

    Channel = _Channel
