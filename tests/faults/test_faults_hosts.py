"""Scenario 7 of the fault-injection harness (SPEC §13, many hosts): three hosts, each a
Linux network namespace with its own supervisor, reach one PostgreSQL across a switch. One
is partitioned away by the kernel (its switch port turned off: a black hole) while it runs
jobs; the other hosts take its jobs over after the lease, its late results are refused
once it is healed, and it goes on serving. Nothing is lost or run twice."""

import pytest

from conftest import Conveyor, scenario_unavailable as unavailable
from harness import host_partition, seed
from hosts import Hosts, HostsUnavailable
from pgcluster import ClusterUnavailable, PrivateCluster

HOSTS, HOST_JOBS = 3, 600


@pytest.fixture
def hosts(worker_id):
    try:
        made = Hosts(HOSTS, label=worker_id)
    except HostsUnavailable as exc:
        unavailable(f"many-hosts scenario SKIPPED: {exc}")
    yield made
    left = made.destroy()
    assert not left, f"namespaces or links left behind: {left}"


@pytest.fixture
def cluster(hosts):
    """A private server listening on the switch too (the shared one listens on 127.0.0.1
    only, which a host cannot reach), trusting the hosts' subnet."""
    try:
        server = PrivateCluster(listen_on=[hosts.server_address], trusted=[str(hosts.subnet)])
    except ClusterUnavailable as exc:
        unavailable(f"many-hosts scenario SKIPPED: {exc}")
    yield server
    server.destroy()


@pytest.mark.slow
@pytest.mark.postgres
def test_partitioned_hosts_jobs_run_elsewhere_and_its_late_results_are_refused(
        hosts, cluster, tmp_path, monkeypatch):
    conveyor = Conveyor(cluster.create_database("conveyor"), tmp_path, monkeypatch)
    try:
        figures = host_partition(conveyor, hosts, HOST_JOBS, seed())
    finally:
        conveyor.close()
    print(figures.line())
    assert figures.clean, figures.report()
    assert figures.cut_off >= 1 and figures.recovered == figures.cut_off, figures.line()
    assert figures.fenced >= 1, figures.line()
    assert figures.after_heal >= 1, figures.line()
