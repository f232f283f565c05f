"""The soak: the fault-injection scenarios at full size, over and over until time is up.

    python -m tests.faults.soak --minutes 10 --scenario all [--jobs 5000] [--seed N]

Each run prints one summary line (jobs, kills, restarts, lost, duplicated attempts,
overlaps, audit violations, ...); the end prints a total per scenario and a Markdown
table. Exits 1 if any run found a violation (its folder is kept and named).

PostgreSQL runs get a database of their own on TEST_DATABASE_URL's server (default
postgresql://postgres@127.0.0.1:5432/test), dropped afterwards; the restart scenario makes
a private server and never restarts that one; the many-hosts scenario makes three hosts
(network namespaces: root and iproute2) and a private server they reach; the failover a
private primary and its standby. SQLite runs use a temporary file.
"""
import argparse
import logging
import os
import pathlib
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import pytest  # noqa: E402  (its MonkeyPatch scopes each run's environment)

import conftest  # noqa: E402
import harness  # noqa: E402
from hosts import Hosts  # noqa: E402
from pgcluster import PrivateCluster  # noqa: E402

SCENARIOS = {  # name: (backends, run(conveyor, jobs, seed, cluster or hosts))
    "worker-chaos": (("postgres", "sqlite"), lambda c, n, s, _: harness.worker_chaos(c, n, s)),
    "host-chaos": (("postgres", "sqlite"), lambda c, n, s, _: harness.host_chaos(c, n, s)),
    "database-restarts": (("private-postgres",),
                          lambda c, n, s, cluster: harness.database_restarts(c, cluster, n, s)),
    "partitions": (("postgres",), lambda c, n, s, _: harness.partitions(c, n, s)),
    "many-hosts": (("hosts",), lambda c, n, s, hosts: harness.host_partition(c, hosts, n, s)),
    "stalls": (("postgres", "sqlite"), lambda c, n, s, _: harness.worker_stalls(c, n, s)),
    # Sized in submissions accepted before the kill, and again after the promotion.
    "failover": (("private-standby",),
                 lambda c, n, s, servers: harness.failover(c, *servers, s, before=n // 10)),
    # Sized in seconds of kills: about 50 jobs arrive per second.
    "sqlite-kills": (("sqlite",), lambda c, n, s, _: harness.sqlite_kills(c, n / 50, s)),
}
SUMMED = ("jobs", "succeeded", "dead", "attempts", "fenced", "kills", "restarts", "stalls",
          "partitions", "failovers", "lost", "duplicated_attempts", "overlaps", "misrecorded",
          "audit_violations", "seconds")


def run_once(name, backend, jobs, seed, server_url):
    """One scenario run in a fresh folder, environment and database; returns its Figures."""
    folder = pathlib.Path(tempfile.mkdtemp(prefix=f"conveyor-soak-{name}-"))
    monkeypatch = pytest.MonkeyPatch()
    cluster = database = conveyor = hosts = None
    try:
        if backend == "sqlite":
            url = f"sqlite:///{folder}/conveyor.db"
        elif backend == "private-postgres":
            cluster = PrivateCluster()
            url = cluster.create_database("conveyor")
        elif backend == "private-standby":  # cluster: (primary, its synchronous standby)
            cluster = (PrivateCluster(),)
            cluster[0].create_database("conveyor")
            cluster += (cluster[0].add_standby(),)
            url = harness.failover_url(*cluster, "conveyor")
        elif backend == "hosts":
            hosts = Hosts(3, label="soak")
            cluster = PrivateCluster(listen_on=[hosts.server_address],
                                     trusted=[str(hosts.subnet)])
            url = cluster.create_database("conveyor")
        else:
            database = f"conveyor_soak_{uuid.uuid4().hex[:8]}"
            url = conftest.create_pg_database(database)
        conveyor = conftest.Conveyor(url, folder, monkeypatch)
        logging.getLogger("conveyor").setLevel(logging.ERROR)  # one line per run, not per job
        figures = SCENARIOS[name][1](conveyor, jobs, seed, hosts or cluster)
    except Exception as exc:  # a run that could not finish is a failed run, with its cause
        figures = harness.Figures(name, backend, seed)
        figures.problems.append(f"the run failed: {type(exc).__name__}: {exc}")
    finally:
        if conveyor is not None:
            conveyor.close()
        monkeypatch.undo()
        for server in cluster if isinstance(cluster, tuple) else [cluster]:
            if server is not None:
                server.destroy()
        if hosts is not None:
            hosts.destroy()
        if database is not None:
            conftest.drop_pg_database(database)
    if figures.clean:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        figures.problems.append(f"logs kept in {folder}")
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tests.faults.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="keep starting runs until this much time has passed (each "
                             "scenario runs at least once)")
    parser.add_argument("--scenario", default="all",
                        help=f"all, or a comma-separated list of: {', '.join(SCENARIOS)}")
    parser.add_argument("--jobs", type=int, default=5000, help="jobs per run (default 5000)")
    parser.add_argument("--seed", type=int, help="seed of the first run (default: random)")
    args = parser.parse_args(argv)
    chosen = list(SCENARIOS) if args.scenario == "all" else args.scenario.split(",")
    unknown = [name for name in chosen if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}")
    server_url = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    conftest._pg["url"] = server_url
    rounds = [(name, backend) for name in chosen for backend in SCENARIOS[name][0]]
    seeds = random.Random(args.seed if args.seed is not None else random.randrange(2 ** 32))
    print(f"soak: {args.minutes:g} minutes, {args.jobs} jobs per run, scenarios "
          f"{', '.join(chosen)}; PostgreSQL at {server_url}", flush=True)

    deadline = time.monotonic() + args.minutes * 60
    results = []
    while not results or time.monotonic() < deadline:
        for name, backend in rounds:
            if results and len(results) >= len(rounds) and time.monotonic() >= deadline:
                break
            seed = args.seed if args.seed is not None and not results else seeds.randrange(2 ** 32)
            figures = run_once(name, backend, args.jobs, seed, server_url)
            results.append(figures)
            print(figures.report() if not figures.clean else figures.line(), flush=True)
    print_totals(results)
    return 0 if all(figures.clean for figures in results) else 1


def print_totals(results):
    totals, runs = {}, Counter()
    for figures in results:
        key = (figures.scenario, figures.backend)
        total = totals.setdefault(key, harness.Figures(*key, seed=0))
        for name in SUMMED:
            setattr(total, name, getattr(total, name) + getattr(figures, name))
        runs[key] += 1
    print("\ntotals:")
    for key, total in totals.items():
        print(f"{total.scenario} [{total.backend}] runs={runs[key]} " + " ".join(
            f"{name}={round(getattr(total, name))}" for name in SUMMED))
    print("\n| scenario | database | runs | jobs | faults injected | lost | duplicated attempts "
          "| overlaps | audit violations |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, total in totals.items():
        faults = ", ".join(f"{getattr(total, name)} {name}" for name in
                           ("kills", "restarts", "stalls", "partitions", "failovers")
                           if getattr(total, name))
        print(f"| {total.scenario} | {total.backend} | {runs[key]} | {total.jobs:,} | {faults} "
              f"| {total.lost} | {total.duplicated_attempts} | {total.overlaps} "
              f"| {total.audit_violations} |")


if __name__ == "__main__":
    sys.exit(main())
