"""`python -m bench.web_memory [--db sqlite|postgres] [--rounds 3] [--concurrent 1,8]`

RSS of the web process (the Procfile's gunicorn worker, gunicorn.conf.py as is) while it
takes maximum batches: POST /v1/jobs/batch with 1,000 jobs of a 16 KB payload each (a body
of about 16 MB, just under MAX_REQUEST_BYTES). For each level of concurrency, `--rounds`
rounds of that many batches sent at once; the worker's RSS is sampled every 5 ms
(psutil): the baseline before, the peak, and the RSS once the answers are in and it
has settled.
"""
import argparse
import http.client
import json
import threading
import time

from bench import common

PAYLOAD_BYTES = 16 * 1024
JOBS_PER_BATCH = 1000


def max_batch_body(job_type=common.NOOP):
    """A batch of 1,000 jobs with a 16 KB payload each (also sent by tests/test_api_strict.py)."""
    job = {"type": job_type, "payload": {"blob": "x" * (PAYLOAD_BYTES - 20)}}
    return json.dumps({"jobs": [job] * JOBS_PER_BATCH}).encode()


class RssSampler(threading.Thread):
    """The peak RSS of one process, sampled every 5 ms until stop()."""

    def __init__(self, pid):
        import psutil
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = self.rss()
        self.done = threading.Event()

    def rss(self):
        return self.process.memory_info().rss

    def run(self):
        while not self.done.wait(0.005):
            self.peak = max(self.peak, self.rss())

    def stop(self):
        self.done.set()
        self.join()
        return self.peak


def settled_rss(sampler, quiet_s=0.25, timeout_s=5.0):
    """The RSS once it has not changed for quiet_s (the last answer's memory is handed
    back just after it is sent), or after timeout_s."""
    deadline = time.monotonic() + timeout_s
    value, since = sampler.rss(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
        time.sleep(0.01)
        current = sampler.rss()
        if current != value:
            value, since = current, time.monotonic()
    return value


def post(port, key, body, statuses):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", "/v1/jobs/batch", body=body,
                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    statuses.append(response.status)
    conn.close()


def run(db_kind="sqlite", rounds=3, levels=(1, 8)):
    db = common.Database(db_kind, "web_memory")
    web = None
    try:
        env = common.conveyor_env(db.url)
        common.core(db.url)
        key = common.create_key(env)
        web = common.Web(env)
        web.wait_ready()
        worker = web.pids()[-1]
        body = max_batch_body()
        sampler = RssSampler(worker)
        baseline = sampler.rss()
        results = []
        for concurrent in levels:
            for round_ in range(1, rounds + 1):
                statuses = []
                sampler = RssSampler(worker)
                before = sampler.rss()
                sampler.start()
                clients = [threading.Thread(target=post, args=(web.port, key, body, statuses))
                           for _ in range(concurrent)]
                for client in clients:
                    client.start()
                for client in clients:
                    client.join()
                peak = sampler.stop()
                settled = settled_rss(sampler)
                results.append({"concurrent": concurrent, "round": round_,
                                "before_mb": before / 2**20, "peak_mb": peak / 2**20,
                                "after_mb": settled / 2**20,
                                "peak_over_in_flight": (peak - before) / (len(body) * concurrent),
                                "statuses": sorted(set(statuses))})
        return {"db": db_kind, "body_bytes": len(body), "baseline_mb": baseline / 2**20,
                "rounds": results}
    finally:
        if web is not None:
            web.stop(grace_s=10)
        common.reset_core_connection()
        db.drop()


def report(result):
    rows = [[r["concurrent"], r["round"], f"{r['before_mb']:.0f}", f"{r['peak_mb']:.0f}",
             f"{r['after_mb']:.0f}", f"{r['peak_over_in_flight']:.2f}", r["statuses"]]
            for r in result["rounds"]]
    return common.table(
        ["at once", "round", "before MB", "peak MB", "after MB", "growth / bytes in flight",
         "statuses"], rows,
        title=f"web RSS, max batches ({result['body_bytes']:,} bytes each) on {result['db']}; "
              f"baseline {result['baseline_mb']:.0f} MB")


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.web_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrent", default="1,8", help="batches at once, per level")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    result = run(args.db, args.rounds, tuple(int(n) for n in args.concurrent.split(",")))
    common.say(report(result))
    common.write_result(result, args.json_out)


if __name__ == "__main__":
    main()
