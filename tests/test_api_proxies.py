"""Behind a reverse proxy (SPEC §6): gunicorn with a real HTTP proxy in front of it that
appends the caller's address to X-Forwarded-For, as nginx and Heroku's router do. Clients
connect from distinct loopback addresses (127.0.0.2, 127.0.0.3, ...), so the server sees
the proxy's address (127.0.0.1) for all of them unless it believes X-Forwarded-For.
"""
import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest

from apiserver import admin_key, bearer, gunicorn  # noqa: F401 (fixtures)

CLIENT_A, CLIENT_B, OUTSIDER = "127.0.0.2", "127.0.0.3", "127.0.0.4"
WRONG = "cvy_" + "x" * 43


class ForwardingProxy:
    """A reverse proxy on 127.0.0.1 that passes each request to the upstream with the
    caller's address appended to X-Forwarded-For (nginx's $proxy_add_x_forwarded_for)."""

    def __init__(self, upstream_url):
        upstream = urlparse(upstream_url)

        class Relay(BaseHTTPRequestHandler):
            def relay(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {name: value for name, value in self.headers.items()
                           if name.lower() not in ("x-forwarded-for", "connection")}
                forwarded = self.headers.get_all("X-Forwarded-For") or []
                headers["X-Forwarded-For"] = ", ".join([*forwarded, self.client_address[0]])
                connection = http.client.HTTPConnection(upstream.hostname, upstream.port,
                                                        timeout=30)
                connection.request(self.command, self.path, body, headers)
                answer = connection.getresponse()
                data = answer.read()
                connection.close()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("connection", "content-length", "transfer-encoding"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = relay

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Relay)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy():
    """proxy(upstream_url): a ForwardingProxy in front of it, closed after the test."""
    proxies = []

    def start(upstream_url):
        proxies.append(ForwardingProxy(upstream_url))
        return proxies[-1]
    yield start
    for started in proxies:
        started.close()


def status(url, key, source, headers=None):
    """The status of GET /v1/jobs with this key, sent from the loopback address source."""
    parts = urlparse(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30,
                                            source_address=(source, 0))
    connection.request("GET", "/v1/jobs", headers={**bearer(key), **(headers or {})})
    response = connection.getresponse()
    response.read()
    connection.close()
    return response.status


def test_failed_auth_of_one_client_behind_a_trusted_proxy_does_not_lock_out_another(
        conveyor, gunicorn, proxy):
    server = gunicorn(TRUSTED_PROXIES="127.0.0.1", AUTH_FAIL_LIMIT="3/minute")
    front = proxy(server.url)
    assert [status(front.url, WRONG, CLIENT_A) for _ in range(5)] == [401, 401, 401, 429, 429]
    assert status(front.url, WRONG, CLIENT_B) == 401
    assert status(front.url, WRONG, CLIENT_A) == 429


def test_valid_key_is_never_refused_for_other_clients_failed_auth(conveyor, gunicorn, proxy):
    # No TRUSTED_PROXIES: to the server, every client behind the proxy is the proxy.
    server = gunicorn(AUTH_FAIL_LIMIT="3/minute")
    front = proxy(server.url)
    key = admin_key(conveyor)
    assert [status(front.url, WRONG, CLIENT_A) for _ in range(4)] == [401, 401, 401, 429]
    assert status(front.url, key, CLIENT_B) == 200
    assert status(front.url, key, CLIENT_A) == 200  # not even the failing client's own
    assert status(front.url, WRONG, CLIENT_B) == 429  # the one address the server sees


def test_spoofed_forwarded_for_does_not_dodge_the_failed_auth_limit(conveyor, gunicorn, proxy):
    server = gunicorn(TRUSTED_PROXIES="127.0.0.1", AUTH_FAIL_LIMIT="3/minute")
    front = proxy(server.url)
    # Straight to gunicorn from an untrusted peer: its X-Forwarded-For is ignored.
    direct = [status(server.url, WRONG, OUTSIDER, {"X-Forwarded-For": f"198.51.100.{i}"})
              for i in range(5)]
    assert direct == [401, 401, 401, 429, 429]
    # Through the proxy, entries the client wrote (even a trusted-looking one) are left of
    # the address the proxy appended, and are never reached.
    forged = [status(front.url, WRONG, CLIENT_A, {"X-Forwarded-For": f"198.51.100.{i}, 127.0.0.1"})
              for i in range(5)]
    assert forged == [401, 401, 401, 429, 429]
    assert status(front.url, WRONG, CLIENT_B) == 401
