"""Times as users write and read them: RFC 3339 in, RFC 3339 in UTC out; epoch seconds
inside (the database's clock, see models.now)."""
import re
from datetime import datetime, timezone
from functools import lru_cache

from core.errors import InvalidJob

# RFC 3339's date-time (section 5.6) exactly, with T and Z in capitals (SPEC §6: "nothing
# looser"); datetime.fromisoformat alone also takes spaces, week dates, +0000 and more.
# The offset is optional here only to say when it is what is missing.
_RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
                      r"(?P<offset>Z|[+-][0-9]{2}:[0-9]{2})?")


def parse_time(text, name="run_at"):
    """An RFC 3339 date-time with an offset, as UTC epoch seconds; InvalidJob naming `name`."""
    problem = f"{name} is not an RFC 3339 time with an offset (e.g. 2030-01-01T09:00:00Z)"
    match = _RFC3339.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidJob(f"{problem}: {text!r}", [f"{name}: not an RFC 3339 date-time"])
    if match["offset"] is None:
        raise InvalidJob(f"{name} needs a UTC offset (e.g. 2030-01-01T09:00:00Z): {text!r}",
                         [f"{name}: no UTC offset"])
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:  # each field has its digits, but a 13th month, a 25th hour...
        raise InvalidJob(f"{problem}: {text!r}", [f"{name}: not a valid date and time"]) from None
    try:
        return parsed.astimezone(timezone.utc).timestamp()
    except OverflowError:  # in UTC it falls outside years 1 to 9999, so it cannot be shown
        raise InvalidJob(f"{name} is out of range: {text!r}", [f"{name}: out of range"]) from None


@lru_cache(maxsize=4096)  # the jobs of a batch share their created_at, and mostly run_at
def timestamp(epoch):
    """Epoch seconds as an RFC 3339 string in UTC (None stays None)."""
    if epoch is None:
        return None
    moment = datetime.fromtimestamp(epoch, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
