"""The README's quickstart and tour, pasted as a new user pastes them: the platform started
with the README's start command (past its install steps: the release phase, then honcho
with the Procfile's web and worker) on a fresh SQLite database, then the "In another
terminal" block and the tour block run as one bash script, each command checked for
success and the jobs for the states the README describes."""
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import requests

from conftest import ROOT, ProcessGroup, wait_for

README = os.path.join(ROOT, "README.md")
BIN = os.path.dirname(sys.executable)


def shell_block_after(text, marker):
    """The first ```sh block after the line that contains marker, as a list of lines."""
    start = text.index(marker)
    match = re.compile(r"^```sh\n(.*?)^```$", re.S | re.M).search(text, start)
    return match.group(1).splitlines()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def instrumented(lines, port):
    """A bash script that runs lines one by one, with localhost:5000 pointed at port,
    framing each command's output with its index and exit status (and curl's HTTP status).
    `. .venv/bin/activate` is left out: this interpreter's bin comes first on PATH."""
    script = ["curl() { command curl --max-time 60 -w '\\n::http %{http_code}' \"$@\"; }"]
    commands = []
    for line in lines:
        line = line.replace("localhost:5000", f"localhost:{port}")
        if not line.strip() or line.strip() == ". .venv/bin/activate":
            continue
        script += [f"printf '\\n::begin {len(commands)}\\n'", line,
                   f"printf '\\n::end {len(commands)} %d\\n' $?"]
        commands.append(line)
    script.append("printf '\\n::key %s\\n' \"$KEY\"")
    return "\n".join(script) + "\n", commands


def outcomes(stdout, commands):
    """[(command, exit status, HTTP status or None, body)] in order."""
    results = []
    for index, command in enumerate(commands):
        match = re.search(rf"^::begin {index}\n(.*?)\n::end {index} (\d+)$", stdout, re.S | re.M)
        assert match, f"command {index} never finished: {command}\n{stdout[-2000:]}"
        body, http = match.group(1), None
        http_match = re.search(r"\n?::http (\d+)$", body)
        if http_match:
            body, http = body[:http_match.start()], int(http_match.group(1))
        results.append((command, int(match.group(2)), http, body))
    return results


def request_of(curl_command):
    """(method, path) of a curl command line."""
    method = re.search(r" -X (\w+)", curl_command)
    path = re.search(r"localhost:\d+(/[^\s']*)", curl_command).group(1)
    return (method.group(1) if method else "POST" if " -d " in curl_command else "GET"), path


INSTALL = "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt && "


def start_command():
    """The README's start command past its install steps (this interpreter's packages are
    those of requirements.txt), with honcho told to read an empty env file, so that a
    developer's own .env cannot change the test."""
    with open(README) as f:
        [line] = shell_block_after(f.read(), "<!-- start-command -->")
    assert line.startswith(INSTALL), line
    return line[len(INSTALL):]


@pytest.fixture
def platform(tmp_path):
    """The README's start command from the app folder on a fresh SQLite database; its web
    port."""
    port = free_port()
    empty_env_file = tmp_path / "env"
    empty_env_file.write_text("")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "DATABASE_URL": f"sqlite:///{tmp_path / 'conveyor.db'}", "PORT": str(port),
           "WORKER_CONCURRENCY": "2", "PYTHONUNBUFFERED": "1"}
    for name in ("HANDLER_PATHS", "LOG_FORMAT", "WORKER_QUEUES", "FLASK_APP"):
        env.pop(name, None)
    command = start_command().replace("honcho start", f"honcho -e {empty_env_file} start")
    honcho = ProcessGroup(["bash", "-c", command], env, tmp_path / "honcho.log")

    def answers():
        if honcho.proc.poll() is not None:
            raise AssertionError(f"honcho exited {honcho.proc.returncode}:\n{honcho.log()}")
        try:
            return requests.get(f"http://localhost:{port}/healthz", timeout=5).ok
        except requests.ConnectionError:
            return False

    wait_for(answers, timeout=60, interval=0.1, message="the web process to answer")
    yield port, env, honcho
    honcho.stop(grace_s=10)


def test_the_readme_quickstart_and_tour_work_pasted_as_one_block(platform):
    port, env, honcho = platform
    with open(README) as f:
        text = f.read()
    lines = (shell_block_after(text, "In another terminal")
             + shell_block_after(text, "The whole tour"))
    script, commands = instrumented(lines, port)
    run = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=240)
    results = outcomes(run.stdout, commands)
    log = f"\n--- stderr:\n{run.stderr[-3000:]}\n--- platform:\n{honcho.log()[-3000:]}"

    responses = {}  # (method, path) -> the body of its last response
    for command, status, http, body in results:
        waits = re.search(r"\bflask jobs wait (\d+)", command)
        if waits:  # the README waits only for job 5, the webhook that fails for good
            assert waits.group(1) == "5" and status == 3, f"{command}: exit {status}{log}"
            continue
        assert status == 0, f"{command}: exit {status}\n{body}{log}"
        if http is not None:
            assert 200 <= http < 300, f"{command}: HTTP {http}\n{body}{log}"
            responses[request_of(command)] = body

    def response(method, path):
        return json.loads(responses[method, path])

    assert response("POST", "/v1/jobs/3/cancel")["status"] == "cancelled"
    assert [job["id"] for job in response("POST", "/v1/jobs/batch")["items"]] == [5, 6]
    assert 5 in [job["id"] for job in response("GET", "/v1/dlq")["items"]]
    assert response("POST", "/v1/dlq/5/retry")["id"] == 5
    assert response("GET", "/v1/workers")["items"], "no live workers"

    key = re.search(r"^::key (\S+)$", run.stdout, re.M).group(1)

    def job(job_id):
        answer = requests.get(f"http://localhost:{port}/v1/jobs/{job_id}",
                              headers={"Authorization": f"Bearer {key}"}, timeout=10)
        return answer.json()

    finals = wait_for(lambda: all(job(i)["status"] in ("succeeded", "dead", "cancelled")
                                  for i in range(1, 7)) and {i: job(i) for i in range(1, 7)},
                      timeout=60, message="the tour's jobs to finish")
    assert {i: j["status"] for i, j in finals.items()} == {
        1: "succeeded", 2: "succeeded", 3: "cancelled", 4: "succeeded",
        5: "cancelled", 6: "succeeded"}
    assert finals[3]["attempts"] == []
    assert [a["status"] for a in finals[5]["attempts"]] == ["failed", "failed"], \
        "job 5 ran, was retried from the dead-letter queue, ran again, then was discarded"
