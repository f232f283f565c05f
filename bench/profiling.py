"""py-spy on a live worker, summarised: where its wall-clock time goes.

Sampled with --idle, so time spent waiting (on PostgreSQL, in the poll sleep) counts as
well as Python CPU. Waiting on the database shows as a leaf in peewee's execute_sql /
commit (psycopg2's C code has no Python frame of its own).
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter

DB_WAIT = {"_execute_cursor", "execute_sql", "commit", "rollback", "begin", "_connect", "connect",
           "_close"}
PHASES = (  # first frame from the root that names one of these decides the phase
    ("claim", "claim"),
    ("execute", "handler (execute)"),
    ("report", "report"),
    ("heartbeat", "heartbeat"),
    ("_lease_in_doubt", "loop bookkeeping"),
    ("wait", "idle wait"),
    ("_worn_out", "loop bookkeeping"),
    ("_orphaned", "loop bookkeeping"),
)
FRAME = re.compile(r"^(?P<fn>.+?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy():
    local = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return local if os.path.exists(local) else shutil.which("py-spy")


class PySpy:
    """`py-spy record` attached to pid until stop_and_summarize()."""

    def __init__(self, pid, label, rate=250, idle=True):
        binary = py_spy()
        if binary is None:
            raise RuntimeError("py-spy is not installed: pip install py-spy")
        self.path = tempfile.mktemp(prefix=f"conveyor-bench-pyspy-{label}-", suffix=".txt")
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [binary, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
             # idle: wall clock (waits included); otherwise only the thread holding the GIL
             # (what a single Python process spends its one core on).
             "--output", self.path, *(["--idle"] if idle else ["--gil"]), "--threads",
             "--nonblocking", "--duration", "3600"], stdout=self.log, stderr=subprocess.STDOUT)
        self.thread = "MainThread" if idle else None

    def stop_and_summarize(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if not os.path.exists(self.path):
            self.log.seek(0)
            return {"error": self.log.read().decode(errors="replace")[-500:]}
        summary = summarize(self.path, thread=self.thread)
        summary["raw_file"] = self.path
        return summary

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def parse_frame(text):
    match = FRAME.match(text.strip())
    if not match:
        return text.strip(), ""
    path = match.group("file")
    return match.group("fn"), os.path.basename(path) if "site-packages" in path or \
        path.startswith("/") else path


def summarize(path, thread="MainThread", top=18):
    """Shares of the thread's samples (every thread's when thread is None): by phase of
    the worker loop, by kind of leaf, and the top functions by self and inclusive time."""
    total = 0
    phases, kinds, self_time, inclusive = Counter(), Counter(), Counter(), Counter()
    phase_db = Counter()
    with open(path) as f:
        for line in f:
            head, _, count = line.rstrip("\n").rpartition(" ")
            if not head or not count.isdigit():
                continue
            thread_part, _, stack = head.partition(": ")
            frames = stack.split(";")
            if thread is not None and frames and frames[0] != thread:
                continue
            samples = int(count)
            parsed = [parse_frame(fr) for fr in frames[1:]]
            if not parsed:
                continue
            total += samples
            phase = "other"
            for fn, _ in parsed:
                short = fn.rsplit(".", 1)[-1]
                hit = next((name for key, name in PHASES if short == key), None)
                if hit:
                    phase = hit
                    break
            phases[phase] += samples
            leaf_fn, leaf_file = parsed[-1]
            leaf_short = leaf_fn.rsplit(".", 1)[-1]
            files = {fl for _, fl in parsed}
            if leaf_file == "peewee.py" and leaf_short in DB_WAIT:
                kind = "database round trip (psycopg2 inside peewee execute/commit)"
                phase_db[phase] += samples
            elif phase == "idle wait":
                kind = "idle (poll sleep)"
            elif any(fl.startswith("logging") or "/logging/" in fl for fl in files) or \
                    leaf_file == "__init__.py" and "logging" in leaf_fn.lower():
                kind = "logging"
            elif leaf_file in ("peewee.py",) or "playhouse" in leaf_file:
                kind = "peewee (SQL building, rows)"
            elif leaf_file.startswith("json") or "/json/" in leaf_file or leaf_file in (
                    "encoder.py", "decoder.py"):
                kind = "json"
            elif leaf_file == "metrics.py":
                kind = "metrics"
            else:
                kind = f"other Python ({leaf_file or '?'})"
            kinds[kind] += samples
            self_time[f"{leaf_fn} ({leaf_file})"] += samples
            for name in {f"{fn} ({fl})" for fn, fl in parsed}:
                inclusive[name] += samples
    if not total:
        return {"samples": 0}

    def shares(counter, limit=None):
        return [(name, round(100.0 * n / total, 1)) for name, n in counter.most_common(limit)]
    return {"samples": total,
            "phases": shares(phases),
            "db_wait_by_phase": [(name, round(100.0 * n / total, 1))
                                 for name, n in phase_db.most_common()],
            "kinds": shares(kinds, 12),
            "self": shares(self_time, top),
            "inclusive": shares(inclusive, top + 20)}


def describe(profile, jobs_done=None):
    if "error" in profile:
        return f"  py-spy failed: {profile['error']}"
    if not profile.get("samples"):
        return "  py-spy: no samples"
    if jobs_done == "web":
        lines = [f"  py-spy of the gunicorn worker, --gil: the thread holding the GIL, "
                 f"{profile['samples']:,} samples:"]
    else:
        lines = [f"  py-spy of one worker's main thread, wall clock ({profile['samples']:,} "
                 f"samples):"]
        lines.append("    by phase:  " + ", ".join(f"{n} {p}%" for n, p in profile["phases"]))
        lines.append("    of which waiting on the database: " + ", ".join(
            f"{n} {p}%" for n, p in profile["db_wait_by_phase"]))
    lines.append("    by leaf:   " + "; ".join(f"{n} {p}%" for n, p in profile["kinds"]))
    lines.append("    top self:  " + "; ".join(f"{n} {p}%" for n, p in profile["self"][:15]))
    # Frames every sample goes through (the process's entry points) say nothing.
    telling = [(n, p) for n, p in profile["inclusive"] if p < 95.0]
    lines.append("    top incl.: " + "; ".join(f"{n} {p}%" for n, p in telling[:18]))
    return "\n".join(lines)


if __name__ == "__main__":  # summarise a raw py-spy file: python -m bench.profiling FILE
    import json
    print(json.dumps(summarize(sys.argv[1]), indent=1))
