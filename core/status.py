"""The words of the job and attempt state machines (SPEC §3), named once.

The SQL of core/store spells them as literals (a partial index is used only when a query
repeats its predicate word for word); tests/test_store.py checks those literals against
these names.
"""

# Job statuses
SCHEDULED = "scheduled"
AVAILABLE = "available"
RUNNING = "running"
SUCCEEDED = "succeeded"
RETRYABLE = "retryable"
DEAD = "dead"
CANCELLED = "cancelled"

STATUSES = (SCHEDULED, AVAILABLE, RUNNING, SUCCEEDED, RETRYABLE, DEAD, CANCELLED)
PENDING = (AVAILABLE, SCHEDULED, RETRYABLE)  # waiting to be claimed, now or later
FINAL = (SUCCEEDED, DEAD, CANCELLED)
PRUNABLE = (SUCCEEDED, CANCELLED)  # dead jobs stay until retried or discarded

# Attempt statuses (an attempt is `running` from its claim until its outcome is recorded)
FAILED = "failed"
TIMED_OUT = "timed_out"
CRASHED = "crashed"
INTERRUPTED = "interrupted"
# Claimed by a worker that died (or gave it back) before it began: it does not count.
RELEASED = "released"

ATTEMPT_STATUSES = (RUNNING, SUCCEEDED, FAILED, TIMED_OUT, CRASHED, INTERRUPTED, CANCELLED,
                    RELEASED)

# Callback statuses (SPEC §12): pending until delivered (a 2xx) or failed (given up)
CALLBACK_PENDING = "pending"
CALLBACK_DELIVERED = "delivered"
CALLBACK_FAILED = "failed"
CALLBACK_STATUSES = (CALLBACK_PENDING, CALLBACK_DELIVERED, CALLBACK_FAILED)
