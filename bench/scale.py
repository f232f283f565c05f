"""`python -m bench.scale [--history 0,100000,1000000] [--jobs 20000] [--workers 4]`

Does history slow Conveyor down? For each size: a new PostgreSQL database, that many
succeeded jobs with their attempts inserted in bulk (bench.explain.seed_history), VACUUM
ANALYZE; then the claim and report plans (EXPLAIN ANALYZE of the statements the core
sends, with one job pending and with the drain's backlog), a drain (bench.drain) and a
latency run (bench.latency), each compared with the first size (normally 0); the API's
reads of history through the Procfile's web process (GET /v1/jobs first page, filtered
pages, GET /v1/stats: median of API_REQUESTS each, SPEC §13's target 50 ms); `flask prune`
of the oldest PRUNE_SHARES of the history, in turn (its time should follow what it
deletes); and the tables' and indexes' sizes per million jobs.
"""
import argparse
import json
import statistics
import time

from bench import common, drain, explain, latency

API_REQUESTS = 20
API_READS = {  # name: path
    "GET /v1/jobs": "/v1/jobs",
    "GET /v1/jobs?status=succeeded": "/v1/jobs?status=succeeded",
    "GET /v1/jobs?queue=none": "/v1/jobs?queue=none",
    "GET /v1/stats": "/v1/stats",
}
PRUNE_SHARES = (0.01, 0.1)  # of the history, the oldest first: 1 %, then the next 10 %


def explain_idle(db):
    """Plans with one job pending. The job is deleted afterwards and the tables vacuumed,
    so that the drain starts as on a table that never held it: the explained claim was
    rolled back, which leaves `attempts` one page holding only a dead row, and an ANALYZE
    of that (the drain's) records "0 rows in 1 page", a density of zero that the planner
    keeps applying as the table grows to 20,000 attempts, until the next ANALYZE. Each
    report then scanned the whole of `attempts`: drain 6,600 instead of 11,400 jobs/s at
    0 history, the "0-history anomaly" of earlier runs."""
    from core import jobs
    from core import submission
    [(job, _)] = jobs.enqueue([submission.validate_submission(
        {"type": common.NOOP, "payload": {"n": 999_999_999}}, common.rules())])
    try:
        return explain.analyse(db.url)
    finally:
        db.query("DELETE FROM jobs WHERE id = %s", (job.id,))
        db.query("VACUUM jobs, attempts")


def run_one(history, jobs=20000, workers=4, samples=500):
    db = common.Database("postgres", f"scale_{history}")
    result = {"history": history}
    try:
        common.core(db.url)
        result["seed_s"] = explain.seed_history(db, history) if history else 0.0
        if not history:
            db.query("VACUUM ANALYZE")
        result["table_mb"] = round(db.query(
            "SELECT pg_total_relation_size('jobs') + pg_total_relation_size('attempts')")[0][0]
            / 2 ** 20, 1)
        idle = explain_idle(db)
        result["explain_idle"] = idle
        drained = drain.run(jobs=jobs, workers=workers, db=db, run_audit=False, quiet=True,
                            before_workers=lambda d: explain.analyse(d.url))
        result["explain_backlog"] = drained.pop("before_workers", None)
        result["drain"] = drained
        result["latency"] = latency.run(workers=workers, samples=samples, db=db)
        result["sizes_mb"] = sizes(db)
        result["api_ms"] = api_reads(db)
        result["prune"] = prunes(db, history) if history else []
        return result
    finally:
        common.reset_core_connection()
        db.drop()


def sizes(db):
    """MB of each table's heap and of its indexes (with TOAST), after the drain."""
    found = {}
    for table in ("jobs", "attempts"):
        heap, indexes = db.query(
            "SELECT pg_table_size(%s::regclass), pg_indexes_size(%s::regclass)", (table, table))[0]
        found[table] = {"heap": round(heap / 2 ** 20, 1), "indexes": round(indexes / 2 ** 20, 1)}
    return found


def api_reads(db):
    """{read: median ms} of API_REQUESTS requests each, one client, keep-alive, after one
    request to warm up, through the Procfile's web process."""
    import http.client
    env = common.conveyor_env(db.url)
    key = common.create_key(env)
    web = common.Web(env)
    try:
        web.wait_ready()
        conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=60)
        headers = {"Authorization": f"Bearer {key}"}
        found = {}
        for name, path in API_READS.items():
            times = []
            for _ in range(API_REQUESTS + 1):
                t0 = time.perf_counter()
                conn.request("GET", path, headers=headers)
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    raise RuntimeError(f"{name} answered {response.status}: {body[:200]!r}")
                times.append((time.perf_counter() - t0) * 1000)
            found[name] = round(statistics.median(times[1:]), 2)
            if name == "GET /v1/stats":
                found["stats_totals"] = json.loads(body)["totals"]
        return found
    finally:
        web.stop(grace_s=10)


def prunes(db, history):
    """`flask prune --older-than S` of the oldest PRUNE_SHARES of the history, one after
    another (S: the age of the last job of each share): [{share, deleted, seconds,
    us_per_job}]."""
    env = common.conveyor_env(db.url)
    done, out = 0.0, []
    for share in PRUNE_SHARES:
        done += share
        [(cutoff, now)] = db.query(
            "SELECT finished_at, extract(epoch from clock_timestamp())::float8 FROM jobs "
            "WHERE status = 'succeeded' ORDER BY finished_at OFFSET %s LIMIT 1",
            (int(history * done),))
        older_than = max(1, int(now - cutoff))
        t0 = time.monotonic()
        result = common.flask_cli(env, "prune", "--older-than", str(older_than))
        seconds = time.monotonic() - t0
        if result.returncode != 0:
            raise RuntimeError(f"flask prune failed: {result.stderr.strip()[:300]}")
        deleted = int(result.stdout.split()[1])
        out.append({"share": share, "deleted": deleted, "seconds": round(seconds, 2),
                    "us_per_job": round(seconds / deleted * 1e6, 1) if deleted else None})
    return out


def rows(results):
    base = results[0]
    out = []
    for r in results:
        d, lat = r["drain"], r["latency"]
        idle, backlog = r.get("explain_idle") or {}, r.get("explain_backlog") or {}
        out.append([
            r["history"], r["table_mb"], d.get("jobs_per_s"),
            ratio(d.get("jobs_per_s"), base["drain"].get("jobs_per_s")),
            round(sum(v for k, v in (d.get("cpu_ms_per_job") or {}).items()
                      if k in ("workers", "supervisor", "postgres_backends")), 2),
            lat.get("p50_ms"), lat.get("p99_ms"),
            ratio(lat.get("p50_ms"), base["latency"].get("p50_ms")),
            ratio(lat.get("p99_ms"), base["latency"].get("p99_ms")),
            (idle.get("claim_ms") or [None])[0], (backlog.get("claim_ms") or [None])[0],
            "index" if str(idle.get("claim_uses", "")).startswith("index") and str(
                backlog.get("claim_uses", "")).startswith("index") else "SEQ SCAN"])
    return out


HEADERS = ["history rows", "jobs+attempts MB", "drain jobs/s", "drain vs first",
           "drain CPU ms/job",
           "latency p50 ms", "p99 ms", "p50 vs first", "p99 vs first",
           "claim exec ms (1 pending)", "claim exec ms (backlog)", "claim plan"]


def ratio(value, base):
    return round(value / base, 2) if value and base else None


def history_rows(results):
    out = []
    for r in results:
        million = max(r["history"], 1) / 1e6
        api, sized = r.get("api_ms") or {}, r.get("sizes_mb") or {}
        out.append([r["history"]] + [api.get(name) for name in API_READS] + [
            round(sized[t][part] / million, 1) if r["history"] else None
            for t in ("jobs", "attempts") for part in ("heap", "indexes")] + [
            "; ".join(f"{p['deleted']:,} in {p['seconds']}s ({p['us_per_job']} us/job)"
                      for p in r.get("prune") or []) or "-"])
    return out


HISTORY_HEADERS = [  # the API's reads in ms (median), sizes in MB per million jobs
    "history rows"] + [f"{name} ms" for name in API_READS] + [
    "jobs heap MB/M", "jobs indexes MB/M", "attempts heap MB/M", "attempts indexes MB/M",
    "flask prune (oldest 1 %, then next 10 %)"]


def report(results):
    lines = [common.table(HEADERS, rows(results),
                          title="scale: drain and latency against the history size"),
             common.table(HISTORY_HEADERS, history_rows(results),
                          title="scale: the API's reads of history, sizes, prune")]
    for r in results:
        lines.append(f"history {r['history']:,} (seeded in {r['seed_s']}s):")
        lines.append("  with 1 job pending:")
        lines.append(explain.describe(r["explain_idle"]))
        if r.get("explain_backlog"):
            lines.append("  with the drain's backlog pending:")
            lines.append(explain.describe(r["explain_backlog"]))
        if "error" in r["drain"]:
            lines.append(f"  drain: ERROR {r['drain']['error']}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--history", default="0,100000,1000000")
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    results = []
    for history in (int(h) for h in args.history.split(",")):
        t0 = time.monotonic()
        results.append(run_one(history, args.jobs, args.workers, args.samples))
        r = results[-1]
        common.say(f"history {history:,}: drain {r['drain'].get('jobs_per_s')} jobs/s, latency "
                   f"p50/p99 {r['latency'].get('p50_ms')}/{r['latency'].get('p99_ms')} ms "
                   f"({time.monotonic() - t0:.0f}s)")
    common.say(report(results))
    common.write_result(results, args.json_out)


if __name__ == "__main__":
    main()
