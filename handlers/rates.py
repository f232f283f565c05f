"""How a rate is written (SPEC §11): "N/second", "N/minute" or "N/hour", N a whole number
from 1 to 1,000,000. Part of the handler API (`@handler(rate=...)`); a queue's `rate`
setting is read the same way (core/queues.py), and RATE_PATTERN is its JSON Schema."""
import re
from typing import NamedTuple

MAX_COUNT = 1_000_000
PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}
# N from 1 to MAX_COUNT without a leading zero; "$(?!\n)": "$" alone matches before a final
# newline too.
RATE_PATTERN = r"^([1-9][0-9]{0,5}|1000000)/(second|minute|hour)$(?!\n)"
RATE_FORMAT = f"N/second, N/minute or N/hour with N from 1 to {MAX_COUNT:,}"


class Rate(NamedTuple):
    """At most `count` attempts start in any interval of `period_s` seconds."""
    count: int
    period_s: float

    def __str__(self):
        unit = {period: name for name, period in PERIODS.items()}[self.period_s]
        return f"{self.count}/{unit}"


def parse_rate(text):
    """The Rate that text says; ValueError saying what a rate must be otherwise."""
    match = re.match(RATE_PATTERN, text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{RATE_FORMAT}, not {text!r}")
    return Rate(int(match[1]), PERIODS[match[2]])
