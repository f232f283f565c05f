"""What the core refuses, and why, in its own terms: no HTTP status or title here.

A caller decides how a refusal reads: the web maps each class to a status and a title in
one table (app.PROBLEMS), the CLI prints its detail and errors as one line. Raise only the
leaf classes; `Refused` and `Invalid` are there to be caught.
"""


class Refused(Exception):
    """An expected refusal: `detail` says what was refused and why, `errors` lists each
    part that was wrong, as "field: reason"."""

    def __init__(self, detail, errors=None):
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []


class Invalid(Refused):
    """Something sent is not valid; the subclass says what it was."""


class InvalidJob(Invalid):
    """A job (or a batch of them) as submitted."""


class InvalidRequest(Invalid):
    """A query parameter, header or cursor, rather than the document sent."""


class InvalidSchedule(Invalid):
    """A schedule as submitted, including the job it would enqueue."""


class InvalidKey(Invalid):
    """An API key's name, role or rate limit."""


class InvalidSetting(Invalid):
    """A flow-control setting (SPEC §11): a queue's paused, concurrency or rate, or a rate
    as written (N/second, N/minute, N/hour)."""


class NotFound(Refused):
    """No such job, schedule or key (or one the caller may not see)."""


class Conflict(Refused):
    """The thing's state does not allow this: already ended, already taken, or an
    idempotency key used for a different job."""


class TooLarge(Refused):
    """A payload over its size limit."""


class LeaseLost(Exception):
    """This attempt no longer holds its job: another attempt may be running it."""
