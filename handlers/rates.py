"""How limits are written (SPEC §11): a rate is "N/second", "N/minute" or "N/hour", parsed
by the `limits` library (flask-limiter's), with N a positive integer. Part of the handler
API (`@handler(rate=...)`); the queue settings read rates the same way."""
from typing import NamedTuple

from limits import parse_many

PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}
MAX_COUNT = 1_000_000


class Rate(NamedTuple):
    """At most `count` attempts start in any interval of `period_s` seconds."""
    count: int
    period_s: float

    def __str__(self):
        unit = {period: name for name, period in PERIODS.items()}[self.period_s]
        return f"{self.count}/{unit}"


def parse_rate(text):
    """The Rate that text says; ValueError saying what is wrong otherwise."""
    expected = f"a rate like \"10/second\" (per second, minute or hour), got {text!r}"
    if not isinstance(text, str) or len(text) > 100:
        raise ValueError(expected)
    try:
        items = parse_many(text)
    except ValueError:
        raise ValueError(expected) from None
    if len(items) != 1 or items[0].multiples != 1 or items[0].GRANULARITY.name not in PERIODS:
        raise ValueError(expected)
    count = items[0].amount
    if not 1 <= count <= MAX_COUNT:
        raise ValueError(f"a rate's count must be between 1 and {MAX_COUNT:,}, got {text!r}")
    return Rate(count, PERIODS[items[0].GRANULARITY.name])
