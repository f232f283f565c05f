"""The outbound guard (handlers/outbound.py): which addresses it refuses, what OUTBOUND_ALLOW
admits, and a real session against real local servers: redirects are checked hop by hop
and HTTPS still verifies the host name while the address is pinned."""
import re
import ssl

import pytest
import requests
import trustme

from infra import config
from handlers import OutboundRefused, outbound_session
from handlers.outbound import allowed, refusal
from test_handlers_webhook import Answer, Receiver


@pytest.mark.parametrize("address, kind", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"),
    ("fc00::1", "private"), ("fd12:3456::1", "private"),
    ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
    ("169.254.169.254", "cloud metadata"), ("fd00:ec2::254", "cloud metadata"),
    ("100.100.100.200", "cloud metadata"), ("168.63.129.16", "cloud metadata"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"), ("100.64.0.1", "reserved"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"),
    ("::ffff:169.254.169.254", "cloud metadata"),
    ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ("64:ff9b::a9fe:a9fe", "cloud metadata"),  # NAT64 of 169.254.169.254
])
def test_addresses_on_our_own_network_are_refused(address, kind):
    assert refusal(address) == kind


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700::1111",
                                     "::ffff:8.8.8.8", "2002:808:808::"])
def test_public_addresses_are_not_refused(address):
    assert refusal(address) is None


def test_outbound_allow_matches_addresses_networks_and_exact_host_names():
    allow = config.Settings.from_env(
        {"OUTBOUND_ALLOW": " 10.1.0.0/16, 127.0.0.1 ,Hooks.Internal., ::1"}).outbound_allow
    assert allowed("any", "10.1.2.3", allow) and not allowed("any", "10.2.0.1", allow)
    assert allowed("any", "::ffff:127.0.0.1", allow) and allowed("any", "::1", allow)
    assert allowed("hooks.internal", "10.9.9.9", allow)
    assert not allowed("evil.hooks.internal", "10.9.9.9", allow)


@pytest.mark.parametrize("value", ["10.0.0.256", "10.0.0.1/8", "10.0.0.0/33", "*",
                                   "hooks internal", "a..b"])
def test_a_malformed_outbound_allow_is_refused(value):
    with pytest.raises(config.ConfigError, match=f"OUTBOUND_ALLOW .*{re.escape(value)}"):
        config.Settings.from_env({"OUTBOUND_ALLOW": f"127.0.0.1,{value}"})


@pytest.fixture
def outbound_allow():
    """Set this process's OUTBOUND_ALLOW, as a worker reads it from its settings."""
    def set_allow(value):
        config.reset(config.Settings.from_env({"OUTBOUND_ALLOW": value}))
    yield set_allow
    config.reset()  # the next reader reads the environment again


def test_a_redirect_to_a_refused_address_is_not_followed(outbound_allow):
    inside, trusted = Receiver(host="127.0.0.2"), Receiver()
    try:
        target = inside.script("/admin", Answer(200))
        url = trusted.script("/hook", Answer(307, b"", {"Location": target}))
        outbound_allow("127.0.0.1")

        with pytest.raises(OutboundRefused, match="127.0.0.2"):
            outbound_session().post(url, json={}, allow_redirects=True)

        assert len(trusted.requests_to("/hook")) == 1
        assert inside.connections == 0
    finally:
        inside.close()
        trusted.close()


def test_https_verifies_the_host_name_while_the_address_is_pinned(outbound_allow, tmp_path):
    ca = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(tls)  # a certificate for the name only
    names = []
    tls.sni_callback = lambda sock, name, context: names.append(name)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    receiver = Receiver(tls=tls)
    try:
        outbound_allow("127.0.0.1")
        session = outbound_session()

        by_name = session.post(receiver.script("/tls", Answer(200), host="localhost"),
                               json={}, verify=str(ca_file))
        with pytest.raises(requests.exceptions.SSLError):
            session.post(receiver.script("/tls", Answer(200)), json={}, verify=str(ca_file))

        assert by_name.status_code == 200 and names[0] == "localhost"
        assert len(receiver.requests_to("/tls")) == 1
    finally:
        receiver.close()
