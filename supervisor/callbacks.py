"""Delivering job callbacks (SPEC §12) from a child process of the supervisor.

A POST may wait on a slow receiver for CALLBACK_TIMEOUT_S, and the supervisor's tick (dead
workers, timeouts) must never wait on one: its `callbacks` duty forks a sender when
callbacks are due and none is running. The sender takes due callbacks a batch at a time
under a lease (core/callbacks.py), POSTs each batch at once from a few threads through the
outbound guard (handlers/outbound.py: loopback, private, link-local and metadata addresses
are refused at connect time unless OUTBOUND_ALLOW lists them), records every answer under
its lease, and leaves once nothing has been due for a while, when asked to stop, or when
its supervisor is gone. Killed at any point, it loses nothing: what it held is due again
when the lease is over.
"""
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Optional

import requests

from core import callbacks
from core.errors import NotFound
from handlers.outbound import OutboundRefused, outbound_session
from infra import metrics

log = logging.getLogger("conveyor.callbacks")

BATCH = 10  # callbacks taken at once, all POSTed at once
IDLE_EXIT_S = 2.0  # a sender leaves after this long with nothing due
POLL_S = 0.2
EXCERPT_BYTES = 200
# Errors no retry would mend: the URL itself is unusable.
UNUSABLE_URL = (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema,
                requests.exceptions.MissingSchema, requests.exceptions.InvalidHeader)


def lease_s(timeout_s):
    """How long a taken callback is held: its POST's connect and read timeouts, and room
    to resolve the name and record the answer."""
    return 3 * timeout_s + 5


class Answer(NamedTuple):
    delivered: bool
    error: Optional[str] = None
    give_up: bool = False


def post(url, body, headers, timeout_s):
    """POST body to url through the outbound guard; what came of it."""
    try:
        with outbound_session() as session, session.post(
                url, data=body, headers=headers, timeout=timeout_s, stream=True,
                allow_redirects=False) as response:
            status = response.status_code
            excerpt = next(response.iter_content(EXCERPT_BYTES), b"").decode(errors="replace")
    except OutboundRefused as exc:
        return Answer(False, str(exc), give_up=True)
    except UNUSABLE_URL as exc:
        return Answer(False, f"cannot POST to {url}: {exc}", give_up=True)
    except requests.RequestException as exc:
        return Answer(False, f"POST {url} failed: {exc}")
    if 200 <= status < 300:
        return Answer(True)
    return Answer(False, f"POST {url} answered {status}: {excerpt!r}")


class CallbackSender:
    """The loop of the child process that delivers callbacks for supervisor `owner`."""

    def __init__(self, settings, owner):
        self.settings = settings
        self.owner = owner
        self.parent = os.getppid()
        self.stopping = False

    def run(self):
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        idle_since = time.monotonic()
        try:
            with ThreadPoolExecutor(BATCH, thread_name_prefix="callback") as pool:
                while not self.stopping and os.getppid() == self.parent:
                    taken = callbacks.take_due(self.owner, BATCH,
                                               lease_s(self.settings.callback_timeout_s))
                    if taken:
                        self._deliver(pool, taken)
                        idle_since = time.monotonic()
                    elif time.monotonic() - idle_since > IDLE_EXIT_S:
                        break
                    else:
                        time.sleep(POLL_S)
        finally:
            metrics.flush_quietly()
        return 0

    def _stop(self, *_):
        self.stopping = True  # the batch under way finishes; nothing more is taken

    def _deliver(self, pool, taken):
        sending, answers = [], []
        for delivery in taken:
            request = self._request(delivery)
            if isinstance(request, Answer):
                answers.append((delivery, request))
            else:
                sending.append((delivery, pool.submit(post, delivery.url, *request,
                                                      self.settings.callback_timeout_s)))
        answers += [(delivery, future.result()) for delivery, future in sending]
        for delivery, answer in answers:
            if answer.delivered:
                callbacks.delivered(delivery)
            else:
                callbacks.not_delivered(delivery, answer.error,
                                        self.settings.callback_backoff_base_s,
                                        self.settings.callback_backoff_max_s, answer.give_up)

    @staticmethod
    def _request(delivery):
        """(body, headers) to POST, or the Answer when there is nothing to send."""
        if not delivery.secret:
            return Answer(False, "the job has no API key, so nothing to sign its callback "
                                 "with", give_up=True)
        try:
            body = callbacks.body(delivery)
        except NotFound:
            return Answer(False, "the job is gone (pruned)", give_up=True)
        headers = {"Content-Type": "application/json", "User-Agent": "Conveyor-Callbacks/1",
                   "Conveyor-Job-Id": str(delivery.job_id),
                   callbacks.SIGNATURE_HEADER: callbacks.sign(delivery.secret, body, time.time())}
        return body, headers
