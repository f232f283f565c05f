"""Job types that break `email.send` at the worst moments, built from its own pieces."""
import os
import signal

from handlers import handler
from handlers.email import compose, deliver, send_once


@handler("t.email_fail_after_send")
def fail_after_send(payload, ctx):
    """The send step succeeds, then attempt 1 fails: a retry must not send again."""
    receipt = send_once(payload, ctx)
    if ctx.attempt == 1:
        raise RuntimeError("failed after the send step")
    return receipt


@handler("t.email_crash_mid_send")
def crash_mid_send(payload, ctx):
    """Attempt 1's worker dies after the server accepted the message but before the step
    stored it: the retry sends again, and only the Message-ID lets the receiver notice."""
    def send_then_die():
        receipt = deliver(compose(payload, ctx))
        if ctx.attempt == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return receipt
    return ctx.step("send", send_then_die)
