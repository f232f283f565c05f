"""`python -m bench.memory [--jobs 1000000] [--workers 4] [--max-minutes 15]`

Memory over a long run: a real `python -m supervisor` drains --jobs no-op jobs on
PostgreSQL while this process keeps the queue fed through the core (jobs.enqueue,
transactions of 1,000, backlog between 10,000 and 30,000) and samples the resident set
size (psutil) of the supervisor and of each worker every 2 s. Warm-up ends when 10% of
the jobs (at least 20,000) are done; growth = RSS at the end minus RSS at warm-up, per
process. Stops early at --max-minutes and says how far it got.
"""
import argparse
import time

from bench import common
from bench.drain import pending_counter

LOW, HIGH = 10_000, 30_000


def rss_of(pids):
    import psutil
    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return out


def run(jobs=1_000_000, workers=4, max_minutes=15.0, sample_s=2.0):
    db = common.Database("postgres", "memory")
    supervisor = pending = None
    result = {"system": "conveyor", "workers": workers, "jobs_target": jobs}
    try:
        common.core(db.url)
        env = common.conveyor_env(db.url)  # no stamps: the handler does nothing at all
        pending = pending_counter(db)
        enqueued = 0
        first = min(HIGH, jobs)
        common.enqueue_core(first)
        enqueued += first
        supervisor = common.Supervisor(env, workers)
        supervisor.wait_for_workers()
        t0 = time.monotonic()
        deadline = t0 + max_minutes * 60
        samples = []  # (seconds, done, {pid: rss}, supervisor rss)
        warm_at = max(20_000, jobs // 10)
        next_sample = t0
        seen_pids = set()
        while True:
            left = pending()
            done = enqueued - left
            now = time.monotonic()
            last = done >= jobs or now > deadline
            if now >= next_sample or last:
                pids = supervisor.worker_pids()
                seen_pids.update(pids)
                samples.append((round(now - t0, 1), done, rss_of(pids),
                                rss_of([supervisor.pid]).get(supervisor.pid)))
                next_sample = now + sample_s
            if last:
                break
            if not supervisor.alive():
                result["error"] = f"supervisor exited: {supervisor.log_tail(500)}"
                break
            if left < LOW and enqueued < jobs:
                size = min(HIGH - left, jobs - enqueued)
                common.enqueue_core(size)
                enqueued += size
            else:
                time.sleep(0.2)
        elapsed = time.monotonic() - t0
        final = samples[-1]
        result.update({"jobs_done": final[1], "elapsed_s": round(elapsed, 1),
                       "jobs_per_s": round(final[1] / elapsed, 1),
                       "finished": final[1] >= jobs,
                       "worker_processes_seen": len(seen_pids)})
        if final[1] < jobs:
            result["projected_full_run_min"] = round(jobs / max(final[1], 1) * elapsed / 60, 1)
        warm = next((s for s in samples if s[1] >= warm_at), None)
        result["warm_up_at_jobs"] = warm[1] if warm else None
        result["series"] = [(s[0], s[1], s[3], sorted(s[2].values())) for s in samples]
        if warm is not None and warm is not final:
            per = []
            for pid, rss in final[2].items():
                if pid in warm[2]:
                    per.append({"pid": pid, "warm_mb": round(warm[2][pid] / 2 ** 20, 2),
                                "end_mb": round(rss / 2 ** 20, 2),
                                "growth_kb": round((rss - warm[2][pid]) / 1024)})
            result["worker_rss"] = per
            result["supervisor"] = {"warm_mb": round(warm[3] / 2 ** 20, 2),
                                    "end_mb": round(final[3] / 2 ** 20, 2),
                                    "growth_kb": round((final[3] - warm[3]) / 1024)}
            jobs_after = max(1, final[1] - warm[1])
            total_growth = sum(p["growth_kb"] for p in per) + result["supervisor"]["growth_kb"]
            result["total_growth_kb"] = total_growth
            result["growth_kb_per_100k_jobs"] = round(total_growth * 100_000 / jobs_after, 1)
        return result
    finally:
        if pending is not None:
            pending.close()
        if supervisor is not None:
            supervisor.stop(grace_s=30)
        common.reset_core_connection()
        db.drop()


def report(r):
    lines = [f"memory ({r['workers']} workers): {r.get('jobs_done', 0):,} of {r['jobs_target']:,} "
             f"jobs in {r.get('elapsed_s', 0):.0f}s ({r.get('jobs_per_s', 0):,.0f} jobs/s)"
             + ("" if r.get("finished") else
                f"; stopped at the time limit (a full run would take about "
                f"{r.get('projected_full_run_min')} min)")]
    if "error" in r:
        lines.append(f"  ERROR {r['error']}")
    if "supervisor" in r:
        s = r["supervisor"]
        lines.append(f"  warm-up at {r['warm_up_at_jobs']:,} jobs; supervisor RSS {s['warm_mb']} -> "
                     f"{s['end_mb']} MB ({s['growth_kb']:+} KB)")
        for w in r["worker_rss"]:
            lines.append(f"  worker {w['pid']}: RSS {w['warm_mb']} -> {w['end_mb']} MB "
                         f"({w['growth_kb']:+} KB)")
        lines.append(f"  total growth after warm-up: {r['total_growth_kb']:+} KB "
                     f"({r['growth_kb_per_100k_jobs']:+} KB per 100,000 jobs); worker processes "
                     f"seen: {r['worker_processes_seen']}")
        series = r["series"]
        marks = [series[int(i * (len(series) - 1) / 4)] for i in range(5)]
        lines.append("  RSS through the run (s, jobs done, supervisor MB, workers MB): " + "; ".join(
            f"{t:.0f}s {done:,} {(sup or 0) / 2 ** 20:.1f} "
            f"[{', '.join(f'{w / 2 ** 20:.1f}' for w in workers)}]"
            for t, done, sup, workers in marks))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--max-minutes", type=float, default=15.0)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    result = run(args.jobs, args.workers, args.max_minutes)
    common.say(report(result))
    common.write_result(result, args.json_out)


if __name__ == "__main__":
    main()
