"""`python -m bench.latency [--workers 4|8] [--samples 500] [--interval-ms 20] [--via core|http]`

Submit-to-start latency with idle workers: a real `python -m supervisor --concurrency W`
on an empty queue, warmed up with a few jobs; then one no-op job is submitted every
--interval-ms, and latency = the handler's time.time() at entry minus time.time() just
before the submit call (same host clock).
- via core (default): jobs.enqueue from this process, one transaction per job, as the
  peers' client libraries write straight to their store.
- via http: POST /v1/jobs to the Procfile's gunicorn (adds the web round trip).
"""
import argparse
import json

from bench import common


def run(workers=4, samples=500, interval_ms=20.0, via="core", kind="postgres", db=None,
        label="latency"):
    own_db = db is None
    db = db or common.Database(kind, label)
    stamps = common.Stamps()
    supervisor = web = None
    result = {"system": "conveyor", "db": db.kind, "workers": workers, "via": via}
    try:
        common.core(db.url)
        env = common.conveyor_env(db.url, stamps)
        if via == "http":
            from bench.enqueue import Client
            key = common.create_key(env)
            web = common.Web(env)
            web.wait_ready()
            client = Client(web.port, key)

            def submit(n):
                status, data = client.post("/v1/jobs", json.dumps(
                    {"type": common.NOOP, "payload": {"n": n}}))
                if status != 201:
                    raise RuntimeError(f"POST /v1/jobs answered {status}: {data[:200]!r}")
        else:
            from core import jobs
            from core import submission
            rules = common.rules()

            def submit(n):
                jobs.enqueue([submission.validate_submission(
                    {"type": common.NOOP, "payload": {"n": n}}, rules)])
        supervisor = common.Supervisor(env, workers)
        supervisor.wait_for_workers()
        result["warmed_up"] = common.warm_up(submit, stamps, 2 * workers)
        result.update(common.measure_latency(submit, stamps, samples, interval_ms / 1000.0))
        return result
    finally:
        if supervisor is not None:
            supervisor.stop(grace_s=10)
        if web is not None:
            web.stop(grace_s=10)
        stamps.remove()
        common.reset_core_connection()
        if own_db:
            db.drop()


def report(r):
    return (f"latency ({r['db']}, {r['workers']} idle workers, submit via {r['via']}, one job "
            f"every {r['interval_ms']:g} ms, {r['started']}/{r['samples']} started): "
            f"p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, p99 {r['p99_ms']} ms, max "
            f"{r['max_ms']} ms (submit call p50 {r['submit_call_ms_p50']} ms)")


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--interval-ms", type=float, default=20.0)
    parser.add_argument("--via", choices=("core", "http"), default="core")
    parser.add_argument("--db", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    result = run(args.workers, args.samples, args.interval_ms, args.via, args.db)
    common.say(report(result))
    common.write_result(result, args.json_out)


if __name__ == "__main__":
    main()
