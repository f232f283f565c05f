"""Failover (SPEC §13, issue 16): a private primary with a synchronous streaming standby
(pg_basebackup -R), and Conveyor given libpq's multi-host URL, the standby listed first,
target_session_attrs=read-write. Under load the primary is killed -9 and the standby
promoted; a real gunicorn and real supervisors go on without a restart."""

import pytest

import models
from conftest import scenario_unavailable
from harness import failover, failover_url, seed
from pgcluster import ClusterUnavailable, PrivateCluster



@pytest.fixture
def primary_and_standby():
    """(primary, standby, the multi-host URL of a database on both)."""
    servers = []
    try:
        try:
            servers.append(PrivateCluster())
            servers[0].create_database("conveyor")
            servers.append(servers[0].add_standby())
        except ClusterUnavailable as exc:
            scenario_unavailable(f"failover scenario SKIPPED: {exc}")
        primary, standby = servers
        yield primary, standby, failover_url(primary, standby, "conveyor")
    finally:
        for server in servers:
            server.destroy()


@pytest.mark.slow
@pytest.mark.postgres
def test_web_and_workers_go_on_after_the_primary_is_lost_and_the_standby_promoted(
        primary_and_standby, tmp_path, monkeypatch):
    from conftest import Conveyor
    primary, standby, url = primary_and_standby
    conveyor = Conveyor(url, tmp_path, monkeypatch)
    try:
        # The standby is listed first and answers; libpq passes it over, read-only.
        assert models.db.connection().info.port == primary.port
        figures = failover(conveyor, primary, standby, seed())
        assert models.db.connection().info.port == standby.port
    finally:
        conveyor.close()
    print(figures.line())
    assert figures.clean, figures.report()
