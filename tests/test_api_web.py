"""The web process as it is deployed: the Procfile's web and worker under honcho (the
quickstart's platform, on a database its release phase migrated) running every curl line
of the README, gunicorn with one and with several workers, and rate limits in a real Redis
shared by the processes of WEB_CONCURRENCY=2.
"""
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from core import history
from apiserver import admin_key, bearer, gunicorn, redis_url  # noqa: F401 (fixtures)
from conftest import ROOT, ProcessGroup, free_port, wait_for
from models import Job

README = os.path.join(ROOT, "README.md")
BIN = os.path.dirname(sys.executable)


class Honcho(ProcessGroup):
    """`honcho start web worker`: the Procfile's web and worker, as the quickstart starts
    them (after its release phase, `flask db upgrade`: the conveyor fixture migrated)."""

    def __init__(self, env, tmp_path):
        self.port = free_port()
        empty_env_file = tmp_path / "empty.env"  # a developer's .env must not steer the test
        empty_env_file.write_text("")
        super().__init__([os.path.join(BIN, "honcho"), "start", "-p", str(self.port),
                          "-e", str(empty_env_file), "web", "worker"],
                         env, tmp_path / "honcho.log")
        self.url = f"http://localhost:{self.port}"
        wait_for(self._answers, timeout=30, interval=0.1, message="honcho's web to answer")

    def _answers(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"honcho exited {self.proc.returncode}:\n{self.log()}")
        try:
            return requests.get(f"{self.url}/healthz", timeout=5).status_code == 200
        except requests.ConnectionError:
            return False

    def stop(self):
        super().stop(grace_s=15)


def readme_command_blocks():
    """The ```sh blocks of the README that use curl, as lists of commands."""
    with open(README) as f:
        text = f.read()
    blocks = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        commands = block.replace("\\\n", " ").splitlines()
        if any(line.startswith("curl ") for line in commands):
            blocks.append([line.strip() for line in commands if line.strip()])
    return blocks


def curl_operation(command):
    """(METHOD, /path/{job_id} or /path/{name}) that a README curl line calls."""
    words = shlex.split(command)
    url = next(word for word in words if "localhost:" in word)
    path = url.split("localhost:5000", 1)[1].split("?")[0]
    path = re.sub(r"/v1/(schedules|queues)/[^/]+", r"/v1/\1/{name}", re.sub(r"/\d+", "/{job_id}", path))
    method = words[words.index("-X") + 1] if "-X" in words else ("POST" if "-d" in words else "GET")
    return method, path


def shell(command, env):
    return subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_every_readme_curl_line_succeeds_against_the_procfile_platform(conveyor, tmp_path):
    """The README's command blocks, run in order as a user would, at a user's pace (each
    once the worker has caught up): every curl line a 2xx, every operation shown."""
    env = {**conveyor.env, "PATH": f"{BIN}:{os.environ['PATH']}"}
    platform = Honcho(env, tmp_path)
    try:
        commands = [command for block in readme_command_blocks() for command in block]
        assert "KEY=$(flask keys create me --admin)" in commands
        called = []
        for command in commands:
            wait_for(lambda: not Job.select().where(Job.status.in_(
                ("available", "running"))).exists(), message="the worker to catch up")
            assignment = re.fullmatch(r"(\w+)=\$\((.*)\)", command)
            if assignment:
                name, inner = assignment.groups()
                result = shell(inner, env)
                assert result.returncode == 0, (command, result.stderr)
                env[name] = result.stdout.strip()
            elif command.startswith("curl "):
                live = command.replace("localhost:5000", f"localhost:{platform.port}")
                result = shell(f"{live} -o /dev/null -w '%{{http_code}}'", env)
                assert result.stdout.startswith("2"), (command, result.stdout, result.stderr)
                called.append(curl_operation(command))
            elif command.startswith("flask "):
                result = shell(command, env)
                # The tour waits for job 5, which ends dead: `flask jobs wait` exits 3.
                expected = 3 if command == "flask jobs wait 5" else 0
                assert result.returncode == expected, (command, result.stderr)
        paths = requests.get(f"{platform.url}/openapi.json", timeout=10).json()["paths"]
        assert set(called) == {(method.upper(), path) for path, operations in paths.items()
                               for method in operations}
        assert Job.get_by_id(3).status == "cancelled"
        assert Job.get_by_id(5).status == "cancelled"  # dead, retried, dead again, discarded
        assert [a.status for a in history.attempts_of(5)] == ["failed", "failed"]
    finally:
        platform.stop()
    assert "Traceback" not in platform.log()


@pytest.mark.parametrize("workers", [1, 3])
def test_gunicorn_serves_the_api_with_one_or_several_workers(conveyor, gunicorn, tmp_path, workers):
    access_log = tmp_path / "access.log"
    server = gunicorn(workers=workers, access_log=access_log)
    key = admin_key(conveyor)

    def submit(n):
        response = requests.post(f"{server.url}/v1/jobs", headers=bearer(key),
                                 json={"type": "t.noop", "payload": {"n": n}}, timeout=30)
        return response.status_code

    with ThreadPoolExecutor(12) as pool:
        assert set(pool.map(submit, range(60))) == {201}
    assert Job.select().count() == 60
    scrapes = {tuple(line for line in requests.get(f"{server.url}/metrics", headers=bearer(key),
                                                   timeout=10).text.splitlines()
                     if line.startswith("conveyor_jobs{")) for _ in range(12)}
    assert len(scrapes) == 1  # every worker reports the same numbers: they come from the database
    assert 'conveyor_jobs{queue="default",status="available"} 60.0' in scrapes.pop()
    served_by = {pid for pid, _ in server.served(access_log, "/metrics")}
    assert served_by <= set(server.worker_pids()) and len(server.worker_pids()) == workers


def submit_until_both_processes_answered(server, key, access_log, at_least):
    """Single POST /v1/jobs from 8 threads, each on a new connection (so either gunicorn
    process may accept it), until at least `at_least` were sent and both processes
    answered some; returns [(status, X-RateLimit-Remaining)] of each, and the pids."""
    answers, lock = [], threading.Lock()

    def one(n):
        response = requests.post(f"{server.url}/v1/jobs",
                                 json={"type": "t.noop", "payload": {"n": n}},
                                 headers={**bearer(key), "Connection": "close"}, timeout=30)
        with lock:
            answers.append((response.status_code,
                            response.headers.get("X-RateLimit-Remaining")))

    deadline = time.monotonic() + 30  # well inside the key's one-minute window
    while True:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(len(answers), len(answers) + 64)))
        pids = {pid for pid, _ in server.served(access_log, "/v1/jobs")}
        if (len(answers) >= at_least and len(pids) == 2) or time.monotonic() > deadline:
            return answers, pids


@pytest.mark.parametrize("storage", ["redis", "memory"])
def test_rate_limits_in_redis_are_exact_across_web_concurrency_processes(
        conveyor, gunicorn, redis_url, tmp_path, storage):
    """WEB_CONCURRENCY=2 (read by gunicorn.conf.py) with the limits in Redis: a key at 100
    a minute gets 100 jobs, not 200, however the requests fall on the two processes. Its
    window starts at its first request, so a burst shorter than a minute is one window:
    the count is exact. Each 201 carries a distinct X-RateLimit-Remaining (one counter),
    and the database holds exactly the jobs that were answered 201. With `memory://` each
    process counts alone, which lets more through: the check can fail."""
    access_log = tmp_path / "access.log"
    uri = {"redis": redis_url, "memory": "memory://"}[storage]
    server = gunicorn(workers=None, access_log=access_log, WEB_CONCURRENCY=2,
                      RATELIMIT_STORAGE_URI=uri)
    assert len(server.worker_pids()) == 2
    key = conveyor.flask("keys", "create", "shared", "--rate-limit", "100/minute").stdout.strip()
    answers, pids = submit_until_both_processes_answered(server, key, access_log, at_least=256)
    assert len(pids) == 2, "both gunicorn processes should have answered"
    created = Counter(status for status, _ in answers)[201]
    assert Job.select().count() == created
    if storage == "memory":
        assert created > 100
        return
    assert Counter(status for status, _ in answers) == {201: 100, 429: len(answers) - 100}
    assert sorted(int(left) for status, left in answers if status == 201) == list(range(100))
    # gunicorn logs a request after sending its response: the last lines may lag.
    wait_for(lambda: len(server.served(access_log, "/v1/jobs")) >= len(answers),
             message="the access log to catch up")
    assert Counter(status for _, status in server.served(access_log, "/v1/jobs")) == \
        Counter(status for status, _ in answers)


def test_a_bad_rate_limit_storage_stops_web_with_one_line(conveyor):
    result = conveyor.flask("keys", "list", env={"RATELIMIT_STORAGE_URI": "carrier-pigeon://coop"},
                            check=False)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("conveyor: RATELIMIT_STORAGE_URI 'carrier-pigeon://coop' is not usable")
