"""What every benchmark shares: databases, the no-op handler's stamps, real processes
(`python -m supervisor`, the Procfile's gunicorn), percentiles, tables and results.

Importable with the standard library alone: the peer programs (bench/peerprogs/, run with
bench/.peers' python) use the stamps, the timing loops and the process helpers too.
psycopg2 and psutil are imported where they are needed.

Definitions used by every system, Conveyor and peers alike (bench/RESULTS.md):
- drain: N no-op jobs are enqueued first (and the database ANALYZEd), then the workers
  start. Timing runs from the first handler start (so process start-up is excluded) to the
  moment the system's own store says every job is finished (the stamps tell when every
  handler ran; the store is then polled every 2 ms).
- submit-to-start latency: idle, warmed-up workers; one job submitted every `interval`;
  latency = the handler's time.time() at entry minus time.time() just before the submit
  call, same host clock.
"""
import json
import math
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from urllib.parse import urlparse, urlunparse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_HANDLERS = os.path.join(ROOT, "bench", "handlers")
PEERS_VENV = os.path.join(ROOT, "bench", ".peers")
PG_ADMIN_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
NOOP = "bench.noop"

# ---------------------------------------------------------------------------- stamps
# The no-op handler of every system appends one fixed-size line per job to a file of its
# own process: "<n> <start> <end>\n" (payload number, time.time() at entry and at return).
# Fixed size: the parent counts finished handlers from file sizes alone, without querying
# anything while the workers run.
STAMP_FORMAT = b"%10d %17.6f %17.6f\n"
STAMP_SIZE = len(STAMP_FORMAT % (0, 0.0, 0.0))
_stamp_fds = {}


def stamp(n=0, start=None):
    """Called by a no-op handler: record that job n ran (start = time at its entry)."""
    start = time.time() if start is None else start
    pid = os.getpid()
    fd = _stamp_fds.get(pid)
    if fd is None:
        folder = os.environ.get("BENCH_STAMP_DIR")
        fd = -1
        if folder:
            fd = os.open(os.path.join(folder, f"{pid}.stamps"),
                         os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _stamp_fds[pid] = fd
    if fd >= 0:
        os.write(fd, STAMP_FORMAT % (int(n), start, time.time()))


class Stamps:
    """The parent's side: a folder the handlers write into (BENCH_STAMP_DIR)."""

    def __init__(self, folder=None):
        self.folder = folder or tempfile.mkdtemp(prefix="conveyor-bench-stamps-")

    def count(self):
        total = 0
        for name in os.listdir(self.folder):
            if name.endswith(".stamps"):
                try:
                    total += os.stat(os.path.join(self.folder, name)).st_size
                except FileNotFoundError:
                    pass
        return total // STAMP_SIZE

    def read(self):
        """[(n, start, end, pid)] of every handler run so far."""
        rows = []
        for name in os.listdir(self.folder):
            if not name.endswith(".stamps"):
                continue
            pid = int(name.split(".")[0])
            with open(os.path.join(self.folder, name), "rb") as f:
                for line in f.read().splitlines():
                    n, start, end = line.split()
                    rows.append((int(n), float(start), float(end), pid))
        return rows

    def wait_for(self, count, timeout_s, poll_s=0.02, progress=None, alive=None):
        """Block until `count` handlers ran; return the count reached (less on timeout,
        or as soon as alive() says the workers are gone)."""
        deadline = time.monotonic() + timeout_s
        last_report = last_check = time.monotonic()
        while True:
            seen = self.count()
            if seen >= count or time.monotonic() > deadline:
                return seen
            if alive is not None and time.monotonic() - last_check > 1.0:
                last_check = time.monotonic()
                if not alive():
                    time.sleep(0.5)
                    return self.count()
            if progress and time.monotonic() - last_report > 10:
                progress(seen)
                last_report = time.monotonic()
            time.sleep(poll_s)

    def clear(self):
        for name in os.listdir(self.folder):
            os.unlink(os.path.join(self.folder, name))

    def remove(self):
        self.clear()
        os.rmdir(self.folder)


# ---------------------------------------------------------------------------- timing loops

def measure_drain(jobs, stamps, start_workers, pending, timeout_s=None, progress=None,
                  alive=None):
    """Start the workers on a filled queue and time the drain (definition at the top).

    start_workers(): starts them; pending(): how many jobs the system's store still holds
    unfinished; alive(): False once the workers are gone. Returns a dict of figures (or
    with "error" on a timeout).
    """
    timeout_s = timeout_s or max(120.0, jobs / 50.0)
    started_at = time.time()
    start_workers()
    seen = stamps.wait_for(jobs, timeout_s, progress=progress, alive=alive)
    if seen < jobs:
        return {"error": f"only {seen} of {jobs} handlers ran within {timeout_s:.0f}s"}
    handlers_done = time.time()
    deadline = time.monotonic() + 60
    left = pending()
    while left and time.monotonic() < deadline:
        time.sleep(0.002)
        left = pending()
    confirmed = time.time()
    rows = stamps.read()
    first_start = min(r[1] for r in rows)
    last_end = max(r[2] for r in rows)
    drain_s = confirmed - first_start
    return {
        "jobs": jobs, "drain_s": round(drain_s, 3), "jobs_per_s": round(jobs / drain_s, 1),
        "handler_runs": len(rows),
        "duplicate_runs": len(rows) - len({r[0] for r in rows}),
        "startup_s": round(first_start - started_at, 3),
        "store_lag_ms": round((confirmed - max(last_end, handlers_done)) * 1000, 1),
        "still_pending": left,
        "per_process": sorted((sum(1 for r in rows if r[3] == pid)
                               for pid in {r[3] for r in rows}), reverse=True),
        "window": (first_start, confirmed),
    }


def measure_latency(submit, stamps, samples, interval_s, timeout_s=30.0, base=1):
    """Submit `samples` jobs one by one every interval_s (numbers base..base+samples-1)
    and read each one's handler start. Returns percentiles in ms."""
    submitted = {}
    call_ms = []
    next_at = time.perf_counter()
    for i in range(samples):
        n = base + i
        now = time.perf_counter()
        if next_at > now:
            time.sleep(next_at - now)
        t0 = time.time()
        submit(n)
        call_ms.append((time.time() - t0) * 1000)
        submitted[n] = t0
        next_at += interval_s
    seen_needed = len(submitted)
    deadline = time.monotonic() + timeout_s
    starts = {}
    while time.monotonic() < deadline:
        starts = {r[0]: r[1] for r in stamps.read() if r[0] in submitted}
        if len(starts) >= seen_needed:
            break
        time.sleep(0.05)
    latencies = [(starts[n] - t0) * 1000 for n, t0 in submitted.items() if n in starts]
    result = {"samples": samples, "started": len(latencies), "interval_ms": interval_s * 1000,
              "submit_call_ms_p50": round(percentile(call_ms, 50), 2)}
    result.update(summarize_ms(latencies))
    return result


def summarize_ms(values):
    if not values:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    return {"p50_ms": round(percentile(values, 50), 2), "p95_ms": round(percentile(values, 95), 2),
            "p99_ms": round(percentile(values, 99), 2), "max_ms": round(max(values), 2),
            "mean_ms": round(statistics.fmean(values), 2)}


def warm_up(submit, stamps, count, timeout_s=30.0, base=900_000_000):
    """Run `count` jobs through idle workers before a latency measurement."""
    before = stamps.count()
    for i in range(count):
        submit(base + i)
        time.sleep(0.05)
    return stamps.wait_for(before + count, timeout_s) - before


# ---------------------------------------------------------------------------- maths, tables

def percentile(values, p):
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits=None):
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if digits is None:
            digits = 0 if abs(value) >= 100 else (1 if abs(value) >= 10 else 2)
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(headers, rows, title=None):
    """A plain text table (also valid Markdown)."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h))
              for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(title)
    lines.append("| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        lines.append("| " + " | ".join(c.rjust(w) if i else c.ljust(w)
                                        for i, (c, w) in enumerate(zip(row, widths))) + " |")
    return "\n".join(lines)


def say(*parts):
    print(*parts, flush=True)


def write_result(result, path):
    """Write a command's figures as JSON (bench.all reads them)."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)


# ---------------------------------------------------------------------------- databases

def pg_connect(url, autocommit=True):
    import psycopg2
    conn = psycopg2.connect(url)
    conn.autocommit = autocommit
    return conn


def pg_query(url, sql, params=None):
    conn = pg_connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else None
    finally:
        conn.close()


def with_database(url, name):
    return urlunparse(urlparse(url)._replace(path=f"/{name}"))


class Database:
    """A new, empty database for one measurement: PostgreSQL (own database) or SQLite
    (own file). drop() removes it."""

    def __init__(self, kind, label):
        self.kind = kind
        self.label = label
        if kind == "postgres":
            self.name = f"conveyor_bench_{label}_{uuid.uuid4().hex[:6]}"
            conn = pg_connect(PG_ADMIN_URL)
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{self.name}"')
            conn.close()
            self.url = with_database(PG_ADMIN_URL, self.name)
        elif kind == "sqlite":
            self.folder = tempfile.mkdtemp(prefix=f"conveyor-bench-{label}-")
            self.name = os.path.join(self.folder, "conveyor.db")
            self.url = f"sqlite:///{self.name}"
        else:
            raise ValueError(f"unknown database kind {kind!r}")

    @property
    def is_postgres(self):
        return self.kind == "postgres"

    def query(self, sql, params=None):
        if self.is_postgres:
            return pg_query(self.url, sql, params)
        import sqlite3
        conn = sqlite3.connect(self.name, timeout=30)
        try:
            cur = conn.execute(sql, params or ())
            rows = cur.fetchall()
            conn.commit()
            return rows
        finally:
            conn.close()

    def analyze(self):
        if self.is_postgres:
            pg_query(self.url, "ANALYZE")
        else:
            self.query("ANALYZE")

    def drop(self):
        if self.is_postgres:
            conn = pg_connect(PG_ADMIN_URL)
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            conn.close()
        else:
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.unlink(self.name + suffix)
                except FileNotFoundError:
                    pass
            try:
                os.rmdir(self.folder)
            except OSError:
                pass


# ---------------------------------------------------------------------------- Conveyor

# host:port of a transaction-pooling pgbouncer in front of BENCH_PG_URL's server (`python
# tests/pgbouncer.py`): Conveyor's processes then reach their database through it, and
# LISTEN directly, as docs/scaling.md#pgbouncer says.
PGBOUNCER = os.environ.get("BENCH_PGBOUNCER", "")


def through_pgbouncer(database_url):
    """The settings that point a Conveyor process at database_url through BENCH_PGBOUNCER."""
    if not PGBOUNCER or database_url.startswith("sqlite"):
        return {"DATABASE_URL": database_url}
    parts = urlparse(database_url)
    credentials = f"{parts.username}@" if parts.username else ""
    return {"DATABASE_URL": urlunparse(parts._replace(netloc=credentials + PGBOUNCER)),
            "DATABASE_POOL_MODE": "transaction", "LISTEN_DATABASE_URL": database_url}


def conveyor_env(database_url, stamps=None, **extra):
    """The environment of a benchmarked Conveyor process: the user's defaults, plus the
    bench handlers (HANDLER_PATHS) and LOG_LEVEL=warning."""
    env = dict(os.environ)
    env.update({
        **through_pgbouncer(database_url),
        "HANDLER_PATHS": BENCH_HANDLERS,
        "LOG_LEVEL": "warning",
        "PYTHONUNBUFFERED": "1",
    })
    if stamps is not None:
        env["BENCH_STAMP_DIR"] = stamps.folder
    env.update({k: str(v) for k, v in extra.items()})
    return env


def core(database_url):
    """Point this process at database_url as a Conveyor process does (schema upgraded,
    handlers loaded), so the bench can call the core (jobs.enqueue) directly."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    os.environ.update(conveyor_env(database_url))
    from infra import boot
    from infra import config
    import models
    models.reset_connection()
    config.reset()
    return boot.start()


def rules():
    """The submission rules of this process's settings (after core())."""
    from core.submission import Rules
    from infra.config import settings
    return Rules.from_settings(settings())


def reset_core_connection():
    """Close this process's core connection (before its database is dropped)."""
    models = sys.modules.get("models")
    if models is not None:
        models.reset_connection()


def enqueue_core(count, batch=1000, first=1, type=NOOP):
    """Enqueue `count` no-op jobs numbered first.. through the core (jobs.enqueue, as the
    API does), in transactions of `batch`; returns seconds taken."""
    from core import jobs
    from core import submission
    checked_by = rules()
    t0 = time.perf_counter()
    done = 0
    while done < count:
        size = min(batch, count - done)
        jobs.enqueue([submission.validate_submission({"type": type, "payload": {"n": first + done + i}},
                                                     checked_by)
                      for i in range(size)])
        done += size
    return time.perf_counter() - t0


def flask_cli(env, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", "flask", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def create_key(env, rate_limit="1000000/second"):
    """A real admin key made with `flask keys create NAME --admin` (printed once)."""
    name = f"bench-{uuid.uuid4().hex[:8]}"
    result = flask_cli(env, "keys", "create", name, "--admin", "--rate-limit", rate_limit)
    if result.returncode != 0:
        raise RuntimeError(f"flask keys create failed: {result.stderr.strip()}")
    return result.stdout.strip()


class Process:
    """A real process in its own session (so it and all it forks stop together), its
    output in a log file."""

    def __init__(self, args, env, log_name, cwd=ROOT):
        self.args = args
        self.log_path = os.path.join(tempfile.gettempdir(),
                                     f"conveyor-bench-{log_name}-{uuid.uuid4().hex[:6]}.log")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def log_tail(self, chars=2000):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace_s=10.0, sig=signal.SIGTERM):
        """Signal (SIGTERM), wait up to grace_s, then SIGKILL the whole group."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, sig)
                self.proc.wait(grace_s)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


class Supervisor(Process):
    """A real `python -m supervisor --concurrency N`."""

    def __init__(self, env, concurrency):
        self.concurrency = concurrency
        super().__init__([sys.executable, "-m", "supervisor", "--concurrency", str(concurrency)],
                         env, "supervisor")

    def worker_pids(self):
        import psutil
        try:
            return [c.pid for c in psutil.Process(self.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def wait_for_workers(self, timeout_s=30.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"supervisor exited: {self.log_tail()}")
            pids = self.worker_pids()
            if len(pids) >= self.concurrency:
                return pids
            time.sleep(0.02)
        raise RuntimeError(f"{self.concurrency} workers did not start: {self.log_tail()}")


def procfile_command(kind):
    with open(os.path.join(ROOT, "Procfile")) as f:
        for line in f:
            name, _, command = line.partition(":")
            if name.strip() == kind:
                return shlex.split(command.strip())
    raise RuntimeError(f"no {kind!r} process in the Procfile")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Web(Process):
    """The Procfile's `web` (gunicorn with gunicorn.conf.py, as `honcho start` runs it) on
    a free port."""

    def __init__(self, env):
        self.port = free_port()
        args = procfile_command("web")
        if args[0] == "gunicorn":  # the venv's gunicorn, whatever PATH says
            args[0] = os.path.join(os.path.dirname(sys.executable), "gunicorn")
        super().__init__(args, {**env, "PORT": str(self.port)}, "web")

    def wait_ready(self, timeout_s=30.0):
        import http.client
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"gunicorn exited: {self.log_tail()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn did not answer /healthz: {self.log_tail()}")

    def pids(self):
        import psutil
        try:
            proc = psutil.Process(self.pid)
            return [proc.pid] + [c.pid for c in proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


# ---------------------------------------------------------------------------- CPU and PG stats

def postgres_backends(database_url):
    """pids of the server processes serving database_url's database."""
    name = urlparse(database_url).path.lstrip("/")
    rows = pg_query(PG_ADMIN_URL, "SELECT pid FROM pg_stat_activity WHERE datname = %s", (name,))
    return [r[0] for r in rows]


class CpuMeter:
    """CPU seconds used by groups of processes between start() and stop(); groups are
    callables returning pids (called at both ends: a process seen only at the end counts
    from zero). Also the whole machine's busy time, to show load from outside the run."""

    def __init__(self, groups):
        self.groups = groups
        self.before = {}

    @staticmethod
    def _times(pids):
        import psutil
        out = {}
        for pid in pids:
            try:
                t = psutil.Process(pid).cpu_times()
                out[pid] = t.user + t.system
            except psutil.Error:
                pass
        return out

    def _snapshot(self):
        return {name: self._times(fn()) for name, fn in self.groups.items()}

    def start(self):
        import psutil
        self.before = self._snapshot()
        self.machine_before = psutil.cpu_times()
        self.t0 = time.monotonic()

    def sample(self):
        """Keep the latest figures of processes that may exit before stop()."""
        self.last = self._snapshot()

    def stop(self):
        import psutil
        after = self._snapshot()
        last = getattr(self, "last", {})
        elapsed = time.monotonic() - self.t0
        machine = psutil.cpu_times()
        busy = sum(getattr(machine, f) - getattr(self.machine_before, f)
                   for f in ("user", "system", "nice", "irq", "softirq", "steal"))
        result = {"elapsed_s": round(elapsed, 2), "machine_busy_cores": round(busy / elapsed, 2)}
        for name in self.groups:
            merged = {**last.get(name, {}), **after.get(name, {})}
            used = sum(t - self.before.get(name, {}).get(pid, 0.0) for pid, t in merged.items())
            result[f"{name}_cpu_s"] = round(used, 2)
        return result


def pg_stats(database_url):
    """Counters of the database (commits, tuples), its jobs/attempts tables and the
    server's WAL (cluster-wide: other databases' writes count too)."""
    name = urlparse(database_url).path.lstrip("/")
    out = {}
    row = pg_query(PG_ADMIN_URL, "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, "
                   "tup_deleted, tup_returned, tup_fetched, blks_read, blks_hit "
                   "FROM pg_stat_database WHERE datname = %s", (name,))[0]
    for key, value in zip(("xact_commit", "xact_rollback", "tup_inserted", "tup_updated",
                           "tup_deleted", "tup_returned", "tup_fetched", "blks_read",
                           "blks_hit"), row):
        out[key] = value
    wal = pg_query(PG_ADMIN_URL, "SELECT wal_records, wal_fpi, wal_bytes, wal_write, wal_sync "
                   "FROM pg_stat_wal")[0]
    for key, value in zip(("wal_records", "wal_fpi", "wal_bytes", "wal_write", "wal_sync"), wal):
        out[key] = int(value)
    for table in ("jobs", "attempts"):
        rows = pg_query(database_url, "SELECT n_tup_ins, n_tup_upd, n_tup_hot_upd, seq_scan, "
                        "idx_scan FROM pg_stat_user_tables WHERE relname = %s", (table,))
        if rows:
            for key, value in zip(("ins", "upd", "hot_upd", "seq_scan", "idx_scan"), rows[0]):
                out[f"{table}_{key}"] = value or 0
    return out


def per_job(before, after, jobs):
    """The counter deltas divided by the number of jobs."""
    return {key: round((after[key] - before[key]) / jobs, 2) for key in after
            if key in before}


def machine():
    """What the figures were measured on."""
    import platform
    info = {"cpus": os.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        info["postgres"] = pg_query(PG_ADMIN_URL, "SHOW server_version")[0][0]
        for setting in ("synchronous_commit", "shared_buffers", "fsync"):
            info[f"pg_{setting}"] = pg_query(PG_ADMIN_URL, f"SHOW {setting}")[0][0]
    except Exception as exc:  # noqa: BLE001 - figures only
        info["postgres"] = f"unavailable: {exc}"
    try:
        from redis import Redis
        info["redis"] = Redis.from_url(REDIS_URL).info("server")["redis_version"]
    except Exception:  # noqa: BLE001
        pass
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f
                               if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info
