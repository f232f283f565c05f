"""`email.send` against a real SMTP server (aiosmtpd) run by the test, with real workers:
one message per job however attempts end, a Message-ID stable across attempts, and the
server's replies deciding between retry and dead letter."""
import hashlib
import socket
import ssl
from email import message_from_bytes, policy

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from conftest import wait_for
from core.errors import Invalid

SENDER = "noreply@example.org"


class Mailbox:
    """The server's handler: keeps each message; refuses "nobody@", greylists
    "greylisted@" once (451), and accepts everyone else."""

    def __init__(self):
        self.messages = []
        self.deferred = set()
        self.logins = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local_part = address.partition("@")[0]
        if local_part == "nobody":
            return "550 5.1.1 no such user here"
        if local_part == "greylisted" and address not in self.deferred:
            self.deferred.add(address)
            return "451 4.7.1 greylisted, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(message_from_bytes(envelope.content, policy=policy.default))
        return "250 OK queued"

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        self.logins.append((auth_data.login.decode(), auth_data.password.decode()))
        return AuthResult(success=auth_data.password == b"p@ss:word")


class MailServer(Controller):
    """An SMTP server on a socket bound before it starts: until `start`, connections to
    its port are refused, as to a server that is down."""

    def __init__(self, mailbox, **smtp_options):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        super().__init__(mailbox, hostname="127.0.0.1", port=self.sock.getsockname()[1],
                         **smtp_options)

    def _create_server(self):
        return self.loop.create_server(self._factory_invoker, sock=self.sock,
                                       ssl=self.ssl_context)

    def url(self, scheme="smtp", userinfo=""):
        return f"{scheme}://{userinfo}127.0.0.1:{self.port}"

    def close(self):
        if self._thread is not None:  # started
            self.stop()
        self.sock.close()


@pytest.fixture
def mailbox():
    return Mailbox()


@pytest.fixture
def mail_server(mailbox):
    server = MailServer(mailbox)
    yield server
    server.close()


def expected_message_id(key, job_id, *recipients):
    seed = "\n".join([key, str(job_id), *sorted(recipients)])
    return f"<{hashlib.sha256(seed.encode()).hexdigest()[:40]}@example.org>"


def email(to="ann@example.com", **fields):
    return {"to": to, "subject": "Your receipt", "text": "Thanks for order 42.", **fields}


def test_message_arrives_once_with_a_message_id_from_the_idempotency_key(conveyor, mail_server,
                                                                         mailbox):
    mail_server.start()
    job_id = conveyor.submit("email.send", email(html="<p>Thanks for order 42.</p>"),
                             idempotency_key="receipt-42")
    conveyor.start_supervisor(SMTP_URL=mail_server.url(), SMTP_FROM=SENDER)

    job = conveyor.wait_for_status(job_id, "succeeded", "dead")

    message_id = expected_message_id("receipt-42", job_id, "ann@example.com")
    assert (job.status, job.result) == ("succeeded", {"message_id": message_id, "refused": {}})
    [message] = mailbox.messages
    assert (message["To"], message["From"], message["Subject"]) == \
        ("ann@example.com", SENDER, "Your receipt")
    assert message["Message-ID"] == message_id
    assert message.get_body(("plain",)).get_content().strip() == "Thanks for order 42."
    assert message.get_body(("html",)).get_content().strip() == "<p>Thanks for order 42.</p>"


def test_a_retry_after_the_send_step_does_not_send_again(conveyor, mail_server, mailbox):
    mail_server.start()
    job_id = conveyor.submit("t.email_fail_after_send", email(to=["ann@example.com",
                                                                  "bob@example.com"]))
    conveyor.start_supervisor(SMTP_URL=mail_server.url(), SMTP_FROM=SENDER)

    job = conveyor.wait_for_status(job_id, "succeeded", "dead")

    assert job.status == "succeeded"
    assert [a.status for a in conveyor.attempts(job_id)] == ["failed", "succeeded"]
    [message] = mailbox.messages
    assert message["To"] == "ann@example.com, bob@example.com"
    assert job.result["message_id"] == message["Message-ID"] == \
        expected_message_id(str(job_id), job_id, "ann@example.com", "bob@example.com")


def test_a_resend_after_a_crash_mid_step_keeps_the_message_id(conveyor, mail_server, mailbox):
    mail_server.start()
    job_id = conveyor.submit("t.email_crash_mid_send", email())
    conveyor.start_supervisor(SMTP_URL=mail_server.url(), SMTP_FROM=SENDER)

    job = conveyor.wait_for_status(job_id, "succeeded", "dead")

    assert job.status == "succeeded"
    assert [a.status for a in conveyor.attempts(job_id)] == ["crashed", "succeeded"]
    # Sent twice (no step could record the first send), deduplicable by the receiver.
    assert [m["Message-ID"] for m in mailbox.messages] == \
        [expected_message_id(str(job_id), job_id, "ann@example.com")] * 2


def test_a_550_rejection_is_permanent(conveyor, mail_server, mailbox):
    mail_server.start()
    job_id = conveyor.submit("email.send", email(to="nobody@example.com"))
    conveyor.start_supervisor(SMTP_URL=mail_server.url(), SMTP_FROM=SENDER)

    job = conveyor.wait_for_status(job_id, "succeeded", "dead")

    assert (job.status, job.dead_reason) == ("dead", "permanent")
    [attempt] = conveyor.attempts(job_id)
    assert attempt.error_type == "Permanent" and "550" in attempt.error_message
    assert mailbox.messages == []


def test_a_4xx_deferral_is_retried(conveyor, mail_server, mailbox):
    mail_server.start()
    job_id = conveyor.submit("email.send", email(to="greylisted@example.com"))
    conveyor.start_supervisor(SMTP_URL=mail_server.url(), SMTP_FROM=SENDER)

    job = conveyor.wait_for_status(job_id, "succeeded", "dead")

    assert job.status == "succeeded"
    first, _ = conveyor.attempts(job_id)
    assert first.error_type == "SMTPRecipientsRefused" and "451" in first.error_message
    assert len(mailbox.messages) == 1


def test_a_server_that_is_down_is_retried_until_it_is_up(conveyor, mail_server, mailbox):
    job_id = conveyor.submit("email.send", email(), max_attempts=50)
    conveyor.start_supervisor(SMTP_URL=mail_server.url(), SMTP_FROM=SENDER)
    wait_for(lambda: any(a.status == "failed" for a in conveyor.attempts(job_id)),
             message="an attempt to fail while the server is down")

    mail_server.start()
    job = conveyor.wait_for_status(job_id, "succeeded", "dead")

    assert job.status == "succeeded"
    attempts = conveyor.attempts(job_id)
    assert {a.error_type for a in attempts[:-1]} == {"ConnectionRefusedError"}
    assert len(mailbox.messages) == 1


def test_smtps_with_a_login(conveyor, mailbox, tmp_path):
    # A CA of the test's own, trusted by the workers through SSL_CERT_FILE.
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    # aiosmtpd counts only STARTTLS as TLS for AUTH; this connection is TLS from the start.
    server = MailServer(mailbox, ssl_context=context, authenticator=mailbox.authenticate,
                        auth_require_tls=False)
    server.start()
    try:
        job_id = conveyor.submit("email.send", email(**{"from": "billing@example.org"}))
        conveyor.start_supervisor(SMTP_URL=server.url("smtps", "mailer:p%40ss%3Aword@"),
                                  SSL_CERT_FILE=tmp_path / "ca.pem")

        job = conveyor.wait_for_status(job_id, "succeeded", "dead")
    finally:
        server.close()

    assert job.status == "succeeded", job.last_error
    assert mailbox.logins == [("mailer", "p@ss:word")]
    [message] = mailbox.messages
    assert message["From"] == "billing@example.org"


@pytest.mark.parametrize("smtp_url", ["", "http://mail.example.com", "smtp://"])
def test_a_missing_or_bad_smtp_url_fails_the_attempt_not_the_import(conveyor, smtp_url):
    job_id = conveyor.submit("email.send", email(), max_attempts=2)
    conveyor.start_supervisor(SMTP_URL=smtp_url, SMTP_FROM=SENDER)

    job = conveyor.wait_for_status(job_id, "succeeded", "dead")

    assert (job.status, job.dead_reason) == ("dead", "max_attempts")
    assert {(a.error_type, "SMTP_URL" in a.error_message) for a in conveyor.attempts(job_id)} == \
        {("SMTPConfigError", True)}


@pytest.mark.parametrize("payload", [
    email(to="ann@example.com\nBcc: everyone@example.com"),
    email(subject="Hello\r\nBcc: everyone@example.com"),
    email(to=[]),
    {"to": "ann@example.com", "subject": "no text"},
])
def test_bad_payloads_are_refused_at_submission(conveyor, payload):
    with pytest.raises(Invalid):
        conveyor.submit("email.send", payload)
