"""A firewall for test processes: with TEST_EGRESS_LOG set, every attempt to connect a socket
to an address that is not loopback is refused and recorded in that file ("<host> <port>").

The outbound guard's tests name metadata and private addresses; if the guard ever failed,
this keeps the suite from sending traffic to them, and the log shows the attempt.
"""
import os
import socket
import sys
from ipaddress import ip_address


def _is_loopback(host):
    try:
        return ip_address(host.split("%")[0]).is_loopback
    except ValueError:  # a host name handed to connect(): not known to be local
        return False


def _refuse_egress(event, args):
    if event != "socket.connect":
        return
    sock, address = args
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or _is_loopback(address[0]):
        return
    with open(os.environ["TEST_EGRESS_LOG"], "a") as log:
        log.write(f"{address[0]} {address[1]}\n")
    raise PermissionError(f"the test suite refuses connections to {address[0]}")


if os.environ.get("TEST_EGRESS_LOG"):
    sys.addaudithook(_refuse_egress)
