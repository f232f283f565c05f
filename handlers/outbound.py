"""The outbound guard: HTTP requests from jobs that cannot reach this host or its network.

A payload's URL is chosen by whoever submits the job, so a plain POST could read a cloud
metadata service or poke an internal admin port (SPEC §12). `outbound_session()` is a
`requests.Session` whose every connection, redirects included, resolves the host once,
checks each address it got and connects to exactly a checked one: a DNS answer that
changes between a check and the connect (rebinding) never reaches the socket. Loopback,
private, link-local, cloud metadata, unspecified, multicast and reserved addresses (and
IPv6 forms that embed one) are refused with `OutboundRefused`, a `Permanent`, unless
OUTBOUND_ALLOW lists the address, its network or the URL's host name. TLS still checks
the certificate against the host name: only the IP address is pinned.
"""
import socket
from ipaddress import IPv4Address, ip_address, ip_network

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util import connection as urllib3_connection

from infra import config
from handlers.errors import Permanent

# Answer on a link-local or otherwise odd address that some clouds route to the host.
METADATA = frozenset(ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, Oracle, OpenStack, DigitalOcean
    "169.254.170.2",  # AWS ECS task credentials
    "fd00:ec2::254",  # AWS over IPv6
    "100.100.100.200",  # Alibaba Cloud
    "168.63.129.16",  # Azure wire server: a public address, so named here
))
NAT64 = ip_network("64:ff9b::/96")  # the well-known prefix: the last 32 bits are IPv4
KINDS = (("is_unspecified", "unspecified"), ("is_loopback", "loopback"),
         ("is_link_local", "link-local"), ("is_multicast", "multicast"),
         ("is_reserved", "reserved"), ("is_private", "private"))


class OutboundRefused(Permanent):
    """A destination the guard refuses: retrying would connect to the same place."""


def refusal(address):
    """Why a connection to `address` must be refused ("loopback", …), or None if public."""
    address = ip_address(address)
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        return refusal(embedded)
    if address in METADATA:
        return "cloud metadata"
    for test, kind in KINDS:
        if getattr(address, test):
            return kind
    return None if address.is_global else "reserved"


def _embedded_ipv4(address):
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64), else None."""
    if address.version != 6:
        return None
    if address in NAT64:
        return IPv4Address(int(address) & 0xFFFFFFFF)
    return address.ipv4_mapped or address.sixtofour


def allowed(host, address, allow):
    """Whether OUTBOUND_ALLOW (`allow`: networks and host names) trusts host or address."""
    address = ip_address(address)
    address = _embedded_ipv4(address) or address
    return any(address in entry if not isinstance(entry, str) else host == entry
               for entry in allow)


def checked_addresses(host, port, allow):
    """The addresses `host` resolves to (once) that may be connected to, in DNS order.

    Raises OutboundRefused when there are none, naming the first refused address.
    """
    name = host.strip("[]").rstrip(".").lower()
    infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    usable = [a for a in addresses if allowed(name, a, allow) or refusal(a) is None]
    if not usable:
        first = addresses[0]
        shown = first if first == name else f"{first} (for {name})"
        raise OutboundRefused(f"refused to connect to {shown}: {refusal(first)} addresses "
                              f"are refused unless OUTBOUND_ALLOW lists them")
    return usable


def create_connection(address, timeout, source_address=None, socket_options=None):
    """urllib3's create_connection, connecting only to addresses that passed the guard."""
    host, port = address
    error = None
    for checked in checked_addresses(host, port, config.settings().outbound_allow):
        try:
            return urllib3_connection.create_connection(
                (checked, port), timeout, source_address, socket_options)
        except OSError as exc:
            error = exc
    raise error


class _Guarded:
    """urllib3's _new_conn with the guarded connect (urllib3 has no hook for it)."""

    def _new_conn(self):
        try:
            return create_connection((self._dns_host, self.port), self.timeout,
                                     self.source_address, self.socket_options)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        except socket.timeout as exc:
            raise ConnectTimeoutError(
                self, f"Connection to {self.host} timed out. (connect timeout={self.timeout})"
            ) from exc
        except OSError as exc:
            raise NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc


class GuardedHTTPConnection(_Guarded, HTTPConnection):
    pass


class GuardedHTTPSConnection(_Guarded, HTTPSConnection):
    pass  # the TLS handshake still names and verifies self.host, not the pinned address


class GuardedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = GuardedHTTPConnection


class GuardedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = GuardedHTTPSConnection


class GuardedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": GuardedHTTPConnectionPool,
                                                   "https": GuardedHTTPSConnectionPool}

    def proxy_manager_for(self, proxy, **kwargs):
        # The proxy, not us, would connect to the destination: nothing left to check.
        raise OutboundRefused("refused to send through a proxy (HTTP_PROXY, HTTPS_PROXY): "
                              "behind one the destination's address cannot be checked")


def outbound_session():
    """A requests.Session for URLs from payloads: every connection goes through the guard."""
    session = requests.Session()
    adapter = GuardedAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
