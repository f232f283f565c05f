"""`email.send`: send one email over SMTP. A template for handlers with a side effect that
must not happen twice.

The send is a `ctx.step`, so a retry after a successful send returns the stored receipt
instead of sending again. The one gap a step cannot close, a crash between the server's
"250 OK" and the step being stored, is covered by a Message-ID derived from the job's
idempotency key and id: the re-sent copy carries the same one, for receivers to deduplicate.

The server comes from SMTP_URL, read at each attempt (a missing or bad one fails the
attempt, never the import): smtp://[user:pass@]host[:port], smtps:// for TLS from the
first byte (port 465), smtp+starttls:// to upgrade a plain connection (port 587).
The sender is payload "from", else SMTP_FROM.
"""
import hashlib
import os
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from urllib.parse import unquote, urlsplit

from handlers import Permanent, handler

SMTP_TIMEOUT_S = 20
DEFAULT_PORTS = {"smtp": 25, "smtps": 465, "smtp+starttls": 587}

# Unanchored "not" patterns: a "$" would let a trailing newline through (header injection).
_address = {"type": "string", "maxLength": 254, "pattern": r"^[^@]+@[^@]+$",
            "not": {"pattern": r"[\s<>,;\"]"}}
_line = {"type": "string", "maxLength": 998, "not": {"pattern": r"[\r\n]"}}
SCHEMA = {
    "type": "object",
    "required": ["to", "subject", "text"],
    "additionalProperties": False,
    "properties": {
        "to": {"oneOf": [_address, {"type": "array", "items": _address,
                                    "minItems": 1, "maxItems": 100}]},
        "from": _address,
        "subject": _line,
        "text": {"type": "string"},
        "html": {"type": "string"},
    },
}


class SMTPConfigError(Exception):
    """SMTP_URL or SMTP_FROM is missing or unusable on this worker (retried: fix and wait)."""


@handler("email.send", queue="emails", max_attempts=5, timeout_s=60, schema=SCHEMA)
def send_email(payload, ctx):
    return send_once(payload, ctx)


def send_once(payload, ctx):
    """Send the email at most once per job; later attempts get the first send's receipt."""
    return ctx.step("send", lambda: deliver(compose(payload, ctx)))


def compose(payload, ctx):
    recipients = payload["to"] if isinstance(payload["to"], list) else [payload["to"]]
    sender = payload.get("from") or os.environ.get("SMTP_FROM", "").strip()
    if not sender:
        raise SMTPConfigError("no sender: give the payload a \"from\" or set SMTP_FROM")
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = payload["subject"]
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = message_id(ctx, recipients, sender)
    message.set_content(payload["text"])
    if "html" in payload:
        message.add_alternative(payload["html"], subtype="html")
    return message


def message_id(ctx, recipients, sender):
    """The same on every attempt of a job and no other's: the idempotency key is unique
    only per API key, the job id only per Conveyor database, so both and the recipients
    go in."""
    seed = "\n".join([ctx.idempotency_key, str(ctx.job_id), *sorted(recipients)])
    domain = parseaddr(sender)[1].rpartition("@")[2] or "conveyor.invalid"
    return f"<{hashlib.sha256(seed.encode()).hexdigest()[:40]}@{domain}>"


def deliver(message):
    """Hand message to the SMTP server; the receipt names any recipients it refused."""
    client = connect(smtp_url())
    try:
        refused = client.send_message(message)
    except smtplib.SMTPRecipientsRefused as exc:
        if all(code >= 500 for code, _ in exc.recipients.values()):
            raise Permanent(f"every recipient was refused: {_replies(exc.recipients)}") from None
        raise
    except smtplib.SMTPResponseException as exc:
        if exc.smtp_code >= 500:
            raise Permanent(f"the SMTP server refused the message: {exc.smtp_code} "
                            f"{_text(exc.smtp_error)}") from None
        raise
    finally:
        hang_up(client)
    # Some recipients got it: retrying for the others would re-send to those who did.
    return {"message_id": message["Message-ID"], "refused": _replies(refused)}


def smtp_url():
    raw = os.environ.get("SMTP_URL", "").strip()
    if not raw:
        raise SMTPConfigError("SMTP_URL is not set on this worker (e.g. smtps://user:pass@host)")
    url = urlsplit(raw)
    try:
        url.port
    except ValueError:
        raise SMTPConfigError("SMTP_URL has an invalid port") from None
    if url.scheme not in DEFAULT_PORTS:
        # Not echoed: the URL may carry a password.
        raise SMTPConfigError("SMTP_URL must start with smtp://, smtps:// or smtp+starttls://")
    if not url.hostname:
        raise SMTPConfigError("SMTP_URL names no host: smtp://[user:pass@]host[:port]")
    return url


def connect(url):
    """An SMTP client connected (and logged in when url has a user) to url's server.

    Its failures are about the server or our credentials, not the message (a 535 or a
    554 greeting is "permanent" to SMTP, yet fixing SMTP_URL fixes the job): all retry."""
    port = url.port or DEFAULT_PORTS[url.scheme]
    if url.scheme == "smtps":
        client = smtplib.SMTP_SSL(url.hostname, port, timeout=SMTP_TIMEOUT_S,
                                  context=ssl.create_default_context())
    else:
        client = smtplib.SMTP(url.hostname, port, timeout=SMTP_TIMEOUT_S)
    try:
        if url.scheme == "smtp+starttls":
            client.starttls(context=ssl.create_default_context())
        if url.username:
            client.login(unquote(url.username), unquote(url.password or ""))
    except BaseException:
        client.close()
        raise
    return client


def hang_up(client):
    """Say QUIT, ignoring a failure: the message was accepted or refused already."""
    try:
        client.quit()
    except (smtplib.SMTPException, OSError):
        client.close()


def _replies(by_recipient):
    return {rcpt: f"{code} {_text(reply)}" for rcpt, (code, reply) in by_recipient.items()}


def _text(reply):
    return reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
