"""`python -m bench.enqueue [--mode batch|single|core] [--jobs 20000] [--clients 16]
[--web-processes 1,2,4]`

Enqueue through the real web process: the Procfile's `web` (gunicorn, gunicorn.conf.py as
is: one process, WEB_THREADS threads) on PostgreSQL, with an admin key made by
`flask keys create NAME --admin --rate-limit 1000000/second` (the rate limiter stays in
the path; its limit is just out of reach).
- batch: one client, POST /v1/jobs/batch with 1,000 no-op jobs per request, --jobs in all
  (after one warm-up request).
- single: --clients concurrent clients (processes x threads, keep-alive connections),
  POST /v1/jobs one job each, for --seconds after a 1 s warm-up.
- core: no HTTP: jobs.enqueue in transactions of 1,000 from this process (a diagnostic:
  what the core costs without the web layer).
--web-processes 1,2,4: the same measurement once per number of gunicorn processes
(WEB_CONCURRENCY), each with the rate limits counted in Redis (RATELIMIT_STORAGE_URI =
BENCH_REDIS_URL), as several web processes must count them (SPEC §6, §13).
"""
import argparse
import http.client
import json
import multiprocessing
import os
import threading
import time

from bench import common, profiling

JOB = {"type": common.NOOP, "payload": {}}


class Client:
    def __init__(self, port, key):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def post(self, path, body):
        self.conn.request("POST", path, body=body, headers=self.headers)
        response = self.conn.getresponse()
        data = response.read()
        return response.status, data


def _batch(port, key, jobs, per_request):
    client = Client(port, key)
    body = json.dumps({"jobs": [JOB] * per_request})
    status, data = client.post("/v1/jobs/batch", body)  # warm-up
    if status != 201:
        raise RuntimeError(f"batch warm-up answered {status}: {data[:300]!r}")
    requests = max(1, jobs // per_request)
    times = []
    statuses = {}
    t0 = time.perf_counter()
    for _ in range(requests):
        r0 = time.perf_counter()
        status, _ = client.post("/v1/jobs/batch", body)
        times.append((time.perf_counter() - r0) * 1000)
        statuses[status] = statuses.get(status, 0) + 1
    elapsed = time.perf_counter() - t0
    stored = requests * per_request
    return {"jobs": stored, "requests": requests, "per_request": per_request,
            "elapsed_s": round(elapsed, 3), "jobs_per_s": round(stored / elapsed, 1),
            "request_ms_p50": round(common.percentile(times, 50), 1),
            "request_ms_max": round(max(times), 1), "statuses": statuses}


def _single_client_process(port, key, threads, start_at, stop_at, warm_until, out):
    results = []
    lock = threading.Lock()
    body = json.dumps(JOB)

    def loop():
        client = Client(port, key)
        latencies, statuses = [], {}
        while time.time() < start_at:
            time.sleep(0.001)
        while True:
            r0 = time.time()
            if r0 >= stop_at:
                break
            try:
                status, _ = client.post("/v1/jobs", body)
            except (OSError, http.client.HTTPException):
                status = "error"
                client = Client(port, key)
            r1 = time.time()
            if r0 >= warm_until:
                latencies.append((r1 - r0) * 1000)
                statuses[status] = statuses.get(status, 0) + 1
        with lock:
            results.append((latencies, statuses))

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    latencies, statuses = [], {}
    for lat, st in results:
        latencies.extend(lat)
        for k, v in st.items():
            statuses[str(k)] = statuses.get(str(k), 0) + v
    out.put((latencies, statuses, os.times()))


def _single(port, key, clients, seconds, processes=4):
    processes = max(1, min(processes, clients))
    per = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    start_at = time.time() + 1.0
    warm_until = start_at + 1.0
    stop_at = warm_until + seconds
    procs = [ctx.Process(target=_single_client_process,
                         args=(port, key, n, start_at, stop_at, warm_until, out)) for n in per]
    for p in procs:
        p.start()
    collected = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(30)
    latencies, statuses, client_cpu = [], {}, 0.0
    for lat, st, times in collected:
        latencies.extend(lat)
        client_cpu += times.user + times.system
        for k, v in st.items():
            statuses[k] = statuses.get(k, 0) + v
    created = statuses.get("201", 0)
    result = {"clients": clients, "seconds": seconds, "requests": len(latencies),
              "requests_per_s": round(len(latencies) / seconds, 1),
              "created_per_s": round(created / seconds, 1), "statuses": statuses,
              "client_cpu_s": round(client_cpu, 2)}
    result.update(common.summarize_ms(latencies))
    return result


def run(mode="batch", jobs=20000, clients=16, seconds=10.0, per_request=1000, label=None,
        profile=False, web_processes=None):
    """One measurement; web_processes: that many gunicorn processes (WEB_CONCURRENCY), the
    rate limits in Redis (BENCH_REDIS_URL); None: the environment's (the Procfile's one)."""
    db = common.Database("postgres", label or f"enqueue_{mode}")
    web = None
    result = {"system": "conveyor", "mode": mode, "db": "postgres"}
    try:
        common.core(db.url)
        if mode == "core":
            common.enqueue_core(per_request)  # warm-up
            elapsed = common.enqueue_core(jobs, batch=per_request)
            result.update({"jobs": jobs, "per_request": per_request,
                           "elapsed_s": round(elapsed, 3), "jobs_per_s": round(jobs / elapsed, 1)})
            return result
        shared_limits = {} if web_processes is None else {
            "WEB_CONCURRENCY": web_processes, "RATELIMIT_STORAGE_URI": common.REDIS_URL}
        env = common.conveyor_env(db.url, **shared_limits)
        key = common.create_key(env)
        web = common.Web(env)
        web.wait_ready()
        result["web_threads"] = int(env.get("WEB_THREADS", "8"))
        result["web_processes"] = int(env.get("WEB_CONCURRENCY", "1"))
        result["ratelimit_storage"] = env.get("RATELIMIT_STORAGE_URI", "memory://")
        meter = common.CpuMeter({"web": web.pids,
                                 "postgres_backends": lambda: common.postgres_backends(db.url),
                                 "bench": lambda: [os.getpid()]})
        stats_before = common.pg_stats(db.url)
        spy = profiling.PySpy(web.pids()[-1], "web", idle=False) if profile else None
        meter.start()
        if mode == "batch":
            result.update(_batch(web.port, key, jobs, per_request))
            done = result["jobs"]
        else:
            result.update(_single(web.port, key, clients, seconds))
            done = max(1, result["requests"])
        meter.sample()
        result["cpu"] = meter.stop()
        if spy is not None:
            result["profile"] = spy.stop_and_summarize()
        result["cpu_ms_per_job"] = {k[:-6]: round(v * 1000 / done, 3)
                                    for k, v in result["cpu"].items() if k.endswith("_cpu_s")}
        if mode == "single":
            result["cpu_ms_per_job"]["clients"] = round(result["client_cpu_s"] * 1000 / done, 3)
        result["pg_per_job"] = common.per_job(stats_before, common.pg_stats(db.url), done)
        return result
    finally:
        if web is not None:
            web.stop(grace_s=10)
        common.reset_core_connection()
        db.drop()


def report(r):
    if r["mode"] == "core":
        return (f"enqueue core (no HTTP): {r['jobs']:,} jobs in transactions of "
                f"{r['per_request']:,}: {r['jobs_per_s']:,.0f} jobs/s")
    cpu = ", ".join(f"{k} {v:.3f}" for k, v in r["cpu_ms_per_job"].items())
    busy = r["cpu"]["machine_busy_cores"]
    if r["mode"] == "batch":
        text = (f"enqueue batch (POST /v1/jobs/batch, {r['per_request']:,} per request, one "
                f"client): {r['jobs']:,} jobs in {r['elapsed_s']:.2f}s = {r['jobs_per_s']:,.0f} "
                f"jobs/s; request p50 {r['request_ms_p50']} ms; statuses {r['statuses']}\n"
                f"  CPU ms per job: {cpu}; machine busy {busy:.2f} cores; PostgreSQL commits "
                f"per job {r['pg_per_job']['xact_commit']:.3f}")
    else:
        text = (f"enqueue single (POST /v1/jobs, {r['clients']} clients, {r['seconds']:g}s, "
                f"{r['web_processes']} web process(es) x {r['web_threads']} threads, limits in "
                f"{r['ratelimit_storage'].partition(':')[0]}): "
                f"{r['requests_per_s']:,.0f} requests/s ({r['created_per_s']:,.0f} created/s), "
                f"latency p50/p99 {r['p50_ms']}/{r['p99_ms']} ms; statuses {r['statuses']}\n"
                f"  CPU ms per request: {cpu}; machine busy {busy:.2f} cores; PostgreSQL commits "
                f"per request {r['pg_per_job']['xact_commit']:.2f}")
    if "profile" in r:
        text += "\n" + profiling.describe(r["profile"], "web")
    return text


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.enqueue", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("batch", "single", "core"), default="batch")
    parser.add_argument("--jobs", type=int, default=20000, help="batch and core: jobs in all")
    parser.add_argument("--clients", type=int, default=16, help="single: concurrent clients")
    parser.add_argument("--seconds", type=float, default=10.0, help="single: measured seconds")
    parser.add_argument("--per-request", type=int, default=1000, help="batch: jobs per request")
    parser.add_argument("--profile", action="store_true", help="py-spy the gunicorn worker")
    parser.add_argument("--web-processes", type=_counts,
                        help="e.g. 1,2,4: one measurement per number of gunicorn processes, "
                             "the rate limits in Redis (BENCH_REDIS_URL)")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    if args.web_processes is None:
        result = run(args.mode, args.jobs, args.clients, args.seconds, args.per_request,
                     profile=args.profile)
        common.say(report(result))
        common.write_result(result, args.json_out)
        return
    results = []
    for processes in args.web_processes:
        results.append(run(args.mode, args.jobs, args.clients, args.seconds, args.per_request,
                           profile=args.profile, web_processes=processes))
        common.say(report(results[-1]))
    rate = "requests_per_s" if args.mode == "single" else "jobs_per_s"
    common.say(common.table(
        ["web processes (limits in Redis)", rate, "web CPU ms", "machine busy cores"],
        [[r["web_processes"], r[rate], r["cpu_ms_per_job"]["web"], r["cpu"]["machine_busy_cores"]]
         for r in results]))
    common.write_result(results, args.json_out)


def _counts(text):
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of process counts like 1,2,4")
    return counts


if __name__ == "__main__":
    main()
