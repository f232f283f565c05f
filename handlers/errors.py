"""The exceptions a handler raises to steer retries (part of the handler API: import them
from `handlers`). Their own module so that handlers/outbound.py, also part of that API,
can build on `Permanent` without importing the package that imports it."""


class Permanent(Exception):
    """Raise to fail the job without retrying: it goes straight to the dead-letter queue."""

    __module__ = "handlers"  # the name a stored traceback shows, as users import it


class RetryAfter(Exception):
    """Raise to retry after `seconds` (the attempt still counts toward max_attempts)."""

    __module__ = "handlers"

    def __init__(self, seconds, message=None):
        seconds = float(seconds)
        if not seconds >= 0:
            raise ValueError(f"RetryAfter needs a delay of 0 seconds or more, got {seconds!r}")
        self.seconds = seconds
        super().__init__(message or f"retry requested in {seconds:g}s")
