"""`python -m bench.floor [--samples 300] [--gap-ms 20]`

What this machine charges a durable job system between a submission and its start,
whatever its code: the figures below bench.latency's can only sit above (issue 17). Each
is one statement from a client process to PostgreSQL after --gap-ms of quiet, as
bench.latency submits (its workers and the database are idle in between):
- a round trip: `SELECT 1`;
- a durable commit: a one-row INSERT, autocommitted, with `synchronous_commit` on (the
  commit waits for its WAL flush), and the same with it off (no wait: what a broker that
  keeps its queue in memory, as Redis does for Celery and RQ, pays instead).
A job that must be durable when its submission is answered (SPEC §4.4) and whose attempt
must be recorded before its handler runs (§4.2) pays two durable commits, one after the
other, on its way from the submit call to its handler: twice the difference between the
two INSERT rows is what those guarantees cost a peer that keeps neither.
"""
import argparse
import time

from bench import common


def _timed(cursor, sql, samples, gap_s):
    times = []
    for _ in range(samples):
        time.sleep(gap_s)  # the quiet between two submissions, as in bench.latency
        started = time.perf_counter()
        cursor.execute(sql)
        times.append((time.perf_counter() - started) * 1000)
    return times


def run(samples=300, gap_ms=20.0):
    db = common.Database("postgres", "floor")
    try:
        conn = common.pg_connect(db.url)
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute("CREATE TABLE floor (id bigserial PRIMARY KEY, v text)")
            figures = {"round trip (SELECT 1)": _timed(cursor, "SELECT 1", samples, gap_ms / 1000)}
            for setting in ("on", "off"):
                cursor.execute(f"SET synchronous_commit = {setting}")
                figures[f"one-row INSERT, synchronous_commit {setting}"] = _timed(
                    cursor, "INSERT INTO floor (v) VALUES ('x')", samples, gap_ms / 1000)
        conn.close()
    finally:
        db.drop()
    return {name: common.summarize_ms(values) for name, values in figures.items()}


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--gap-ms", type=float, default=20.0)
    args = parser.parse_args()
    figures = run(args.samples, args.gap_ms)
    for name, summary in figures.items():
        common.say(f"{name}: p50 {summary['p50_ms']} ms, p95 {summary['p95_ms']} ms, "
                   f"p99 {summary['p99_ms']} ms")
    on, off = (figures[f"one-row INSERT, synchronous_commit {s}"] for s in ("on", "off"))
    common.say(f"two durable commits cost {2 * (on['p50_ms'] - off['p50_ms']):.2f} ms at p50 "
               f"and {2 * (on['p99_ms'] - off['p99_ms']):.2f} ms at p99 more than two that wait "
               f"for no flush")


if __name__ == "__main__":
    main()
