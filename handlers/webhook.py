"""`webhook.post`: POST a JSON body to a URL. A template for handlers that call an HTTP API.

The receiver's answer decides the retry: 2xx succeeds, 408/429/5xx and network errors
retry (429/503 at the time their `Retry-After` asks for), any other 4xx or a redirect
is `Permanent`, and so is a host on our own network that OUTBOUND_ALLOW does not list
(handlers/outbound.py). Every attempt sends the same `Idempotency-Key` so the receiver can
drop a repeat: a timeout only tells us that we do not know whether the POST arrived.
"""
import email.utils
import time
from datetime import timezone

import requests
from requests.structures import CaseInsensitiveDict

from handlers import Permanent, RetryAfter, handler, outbound_session

JOB_TIMEOUT_S = 60
DEFAULT_TIMEOUT_S = 10
# Below the job's timeout (and below ctx.timeout_s when a job sets a shorter one), so a
# slow receiver fails the attempt with a clear error instead of the worker being killed.
MAX_TIMEOUT_S = JOB_TIMEOUT_S - 10
EXCERPT_BYTES = 500
MAX_RETRY_AFTER_S = 3600  # a receiver must not park a job for days
RETRY_STATUSES = {408, 429}
RETRY_AFTER_STATUSES = {429, 503}

SCHEMA = {
    "type": "object",
    "required": ["url", "body"],
    "additionalProperties": False,
    "properties": {
        "url": {"type": "string", "maxLength": 2048, "pattern": r"^[Hh][Tt][Tt][Pp][Ss]?://[^/?#]",
                "not": {"pattern": r"\s"}},
        "body": {},
        "headers": {
            "type": "object",
            "maxProperties": 50,
            "propertyNames": {"minLength": 1, "maxLength": 100,
                              "not": {"pattern": r"[^!#$%&'*+.^_`|~0-9A-Za-z-]"}},
            "additionalProperties": {"type": "string", "maxLength": 8192,
                                     "not": {"pattern": r"[^\t\x20-\x7e]"}},  # no CR/LF
        },
        "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TIMEOUT_S},
    },
}


class ReceiverError(Exception):
    """The receiver answered with a status worth retrying (5xx, 408, 429)."""


@handler("webhook.post", queue="webhooks", max_attempts=8, timeout_s=JOB_TIMEOUT_S, schema=SCHEMA)
def post_webhook(payload, ctx):
    url = payload["url"]
    headers = CaseInsensitiveDict(payload.get("headers", {}))
    headers["Idempotency-Key"] = ctx.idempotency_key  # ours wins over a payload header
    try:
        with outbound_session() as session, session.post(
                url, json=payload["body"], headers=headers, stream=True,
                timeout=min(payload.get("timeout_s", DEFAULT_TIMEOUT_S), 0.8 * ctx.timeout_s),
                allow_redirects=False) as response:
            status = response.status_code
            excerpt = next(response.iter_content(EXCERPT_BYTES), b"").decode(errors="replace")
            retry_after = response.headers.get("Retry-After")
            location = response.headers.get("Location")
    except (requests.exceptions.InvalidURL, requests.exceptions.InvalidHeader) as exc:
        raise Permanent(f"cannot POST to {url}: {exc}") from None
    answer = f"POST {url} answered {status}: {excerpt[:200]!r}"
    if 200 <= status < 300:
        return {"status": status, "response": excerpt}
    if status in RETRY_AFTER_STATUSES and retry_after is not None:
        delay = retry_after_seconds(retry_after)
        if delay is not None:
            raise RetryAfter(min(delay, MAX_RETRY_AFTER_S),
                             f"{answer} (Retry-After: {retry_after})")
    if status >= 500 or status in RETRY_STATUSES:
        raise ReceiverError(answer)
    if 300 <= status < 400:
        # Following it would turn the POST into a GET (301/302/303): fix the URL instead.
        raise Permanent(f"POST {url} was redirected ({status}) to {location}: update the url")
    raise Permanent(answer)


def retry_after_seconds(value, now=None):
    """Seconds to wait from a Retry-After header (delay-seconds or HTTP-date); None if invalid."""
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always UTC, even when it says "-0000"
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
