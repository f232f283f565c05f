"""`python -m bench.explain [--history 0] [--pending 1]`: the claim and report queries as
the core really sends them, with their plans (EXPLAIN ANALYZE, BUFFERS) on PostgreSQL.

The statements are not rebuilt here: jobs.claim and jobs.report run once in a transaction
that is rolled back, peewee's query log is captured, and each captured statement is then
EXPLAIN ANALYZEd in order, in another transaction that is rolled back too. So the plans
follow the engine as it changes. Also prints how many statements one claim and one report
send (each is a round trip of its own; a worker sends a report and its next claim as one
statement, for a whole batch of jobs).
"""
import argparse
import logging
import os
import re
import socket
import time

from bench import common


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.statements = []

    def emit(self, record):
        if isinstance(record.msg, tuple) and len(record.msg) == 2:
            self.statements.append(record.msg)


def captured(fn):
    """(fn's result, [(sql, params)] it sent through peewee)."""
    logger = logging.getLogger("peewee")
    capture = _Capture()
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(capture)
    try:
        return fn(), capture.statements
    finally:
        logger.removeHandler(capture)
        logger.setLevel(level)
        logger.propagate = propagate


def _is_savepoint(sql):
    return re.match(r"\s*(SAVEPOINT|RELEASE|ROLLBACK TO)", sql, re.I) is not None


def claim_and_report(db_url):
    """The statements of one claim and one successful report, as the core sends them."""
    common.core(db_url)
    from core import jobs
    from core import workers
    import models
    worker = workers.WorkerInfo(id="w-bench-explain", supervisor_id="s-bench-explain",
                             host=socket.gethostname(), pid=os.getpid(), queues=())
    with models.db.atomic() as tx:
        claimed, claim_sql = captured(lambda: jobs.claim(worker, 1))
        report_sql = []
        if claimed:
            _, report_sql = captured(lambda: jobs.report(claimed[0], jobs.Outcome("succeeded")))
        tx.rollback()
    # Outside our rolled-back transaction each statement commits by itself (autocommit).
    return ([s for s in claim_sql if not _is_savepoint(s[0])],
            [s for s in report_sql if not _is_savepoint(s[0])])


def _is_prepare(statement):
    return re.match(r"\s*PREPARE\b", statement[0]) is not None


def explain(db_url, statements):
    """EXPLAIN (ANALYZE, BUFFERS) each statement in order, in one rolled-back transaction.
    The core prepares its hot statements (models.execute): a PREPARE is replayed as it is,
    and an EXECUTE is planned as a worker's session plans it (custom plans)."""
    conn = common.pg_connect(db_url, autocommit=False)
    plans = []
    try:
        with conn.cursor() as cur:
            cur.execute("SET plan_cache_mode = force_custom_plan")  # as the workers plan
            for sql, params in statements:
                if _is_prepare((sql, params)):
                    cur.execute(sql, params)
                    continue
                cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
                plans.append((sql, [row[0] for row in cur.fetchall()]))
    finally:
        conn.rollback()
        conn.close()
    return plans


def index_verdict(plan_lines, table="jobs"):
    """How the plan reads `table`: 'index (<nodes>)', or 'SEQ SCAN' when it scans it."""
    nodes = [line.strip().lstrip("-> ").split("  (")[0] for line in plan_lines
             if re.search(rf"\bon {table}\b", line)]
    if any(n.startswith("Seq Scan") for n in nodes):
        return "SEQ SCAN: " + "; ".join(nodes)
    return "index: " + "; ".join(nodes) if nodes else "no access to " + table


def execution_ms(plan_lines, what="Execution"):
    for line in plan_lines:
        match = re.match(rf"\s*{what} Time: ([\d.]+) ms", line)
        if match:
            return float(match.group(1))
    return None


def analyse(db_url):
    """Plans and verdicts of the claim and report statements."""
    claim_sql, report_sql = claim_and_report(db_url)
    if not claim_sql:
        return {"error": "jobs.claim sent no statement"}
    plans = explain(db_url, claim_sql + report_sql)
    claimed = len([s for s in claim_sql if not _is_prepare(s)])
    reported = len([s for s in report_sql if not _is_prepare(s)])
    claim_plans, report_plans = plans[:claimed], plans[claimed:]
    claim_update = claim_plans[0]
    return {
        # A PREPARE is sent once per connection, not per job: not counted.
        "claim_statements": claimed, "report_statements": reported,
        "round_trips_per_job": claimed + reported,  # at most: batches share them
        "claim_uses": index_verdict(claim_update[1]),
        "claim_ms": [execution_ms(p) for _, p in claim_plans],
        "claim_planning_ms": [execution_ms(p, "Planning") for _, p in claim_plans],
        "report_ms": [execution_ms(p) for _, p in report_plans],
        "report_planning_ms": [execution_ms(p, "Planning") for _, p in report_plans],
        "report_uses": [index_verdict(p) for _, p in report_plans],
        "plans": [{"sql": sql, "plan": plan} for sql, plan in plans],
    }


def seed_history(db, count, chunk=250_000):
    """Insert `count` succeeded jobs, one succeeded attempt each, straight into the tables
    (generate_series), a millisecond apart, the last finished two hours ago (so the hourly
    pruner leaves them, and the jobs a drain then finishes come after all of them in
    `jobs_finished`, as they would: seeded into the future, ten million jobs put the
    drain's entries in the middle of that index, a page read from disk for many of them),
    then VACUUM ANALYZE. Follows migrations/0001_jobs.py: change it with the schema."""
    t0 = time.monotonic()
    done = 0
    while done < count:
        size = min(chunk, count - done)
        before = db.query("SELECT COALESCE(max(id), 0) FROM jobs")[0][0]
        db.query(
            "INSERT INTO jobs (type, queue, payload, priority, run_at, max_attempts, timeout_s, "
            "backoff_base_s, backoff_max_s, status, attempt, created_at, started_at, "
            "finished_at, result) "
            "SELECT 'bench.noop', 'default', '{\"n\":' || g || '}', 0, t, 5, 300, 1, 3600, "
            "'succeeded', 1, t, t + 0.001, t + 0.002, 'null' FROM (SELECT g, "
            "extract(epoch from now())::float8 - 7200 - (%s - g) * 0.001 AS t "
            "FROM generate_series(%s, %s) g) s", (count, done + 1, done + size))
        db.query(
            "INSERT INTO attempts (job_id, number, status, worker_id, host, pid, started_at, "
            "finished_at) SELECT id, 1, 'succeeded', 'w-bench-seed', 'seed', 1, started_at, "
            "finished_at FROM jobs WHERE id > %s", (before,))
        done += size
    db.query("VACUUM ANALYZE")
    # The seed's gigabytes are still being written out (a checkpoint, the kernel's
    # writeback): a drain measured meanwhile shares the disk with them (0.70 of the empty
    # database's drain at 10 million, against the same plans).
    db.query("CHECKPOINT")
    os.sync()
    return round(time.monotonic() - t0, 1)


def describe(analysis, full=False):
    if "error" in analysis:
        return f"  explain: {analysis['error']}"
    lines = [f"  claim: {analysis['claim_statements']} statement(s), "
             f"{analysis['claim_uses']}; execution {analysis['claim_ms']} ms, planning "
             f"{analysis['claim_planning_ms']} ms",
             f"  report: {analysis['report_statements']} statement(s), "
             f"execution {analysis['report_ms']} ms, planning {analysis['report_planning_ms']} ms",
             f"  round trips per job, one job per batch (claim + report, no heartbeat): "
             f"{analysis['round_trips_per_job']}"]
    if full:
        for item in analysis["plans"]:
            lines.append("")
            lines.append("  " + item["sql"])
            lines.extend("    " + line for line in item["plan"])
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.explain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--history", type=int, default=0, help="succeeded jobs to seed first")
    parser.add_argument("--pending", type=int, default=1, help="due jobs waiting")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    db = common.Database("postgres", "explain")
    try:
        common.core(db.url)
        if args.history:
            common.say(f"seeded {args.history:,} finished jobs in {seed_history(db, args.history)}s")
        common.enqueue_core(max(1, args.pending))
        db.analyze()
        analysis = analyse(db.url)
        common.say(f"claim and report with {args.history:,} finished and {args.pending:,} "
                   f"pending jobs:")
        common.say(describe(analysis, full=True))
        common.write_result(analysis, args.json_out)
    finally:
        common.reset_core_connection()
        db.drop()


if __name__ == "__main__":
    main()
