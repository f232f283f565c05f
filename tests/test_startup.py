"""What a new user sees when the platform starts: `flask db upgrade` (the release phase)
says what it applied; web and worker never migrate: on a database that is behind they stop
with one line naming `flask db upgrade`, on a migrated one they say which database and job
types they use (the `flask` commands only at debug); `flask` reads `.env` as honcho does,
and `flask handlers` lists the job types with their options."""
import importlib.metadata
import json
import os
import pkgutil
import re
import select
import socket
import sqlite3
import subprocess
import sys
from urllib.parse import urlparse, urlunparse

import psycopg2
import pytest
from packaging.requirements import Requirement

from apiserver import Gunicorn
from conftest import FAST_ENV, ROOT, TEST_HANDLERS, wait_for
from test_config import GUNICORN_STARTING, _schema, empty_database_url  # noqa: F401 (a fixture)

MIGRATIONS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "migrations"))
                    if f[:1].isdigit() and f.endswith(".py"))
VERSION = int(MIGRATIONS[-1][:4])


def applied(url):
    """The migrations recorded in the database at url (none before its first migration)."""
    if not url.startswith("sqlite"):
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            cur.execute("SELECT to_regclass('schema_migration') IS NOT NULL")
            migrated = cur.fetchone()[0]
        conn.close()
    else:
        with sqlite3.connect(url[len("sqlite:///"):]) as conn:
            migrated = conn.execute("SELECT 1 FROM sqlite_master "
                                    "WHERE name = 'schema_migration'").fetchone()
        conn.close()
    return _schema(url)[1] if migrated else []


def with_password(url, password):
    """url with a password for its user (the test server trusts local users: it is ignored)."""
    if url.startswith("sqlite"):
        return url
    parts = urlparse(url)
    return urlunparse(parts._replace(netloc=f"{parts.username}:{password}@{parts.hostname}"
                                            f":{parts.port or 5432}"))


def shown(url):
    """The database as the start-up line names it: a URL without the password, SQLite's
    path absolute."""
    if url.startswith("sqlite"):
        return url
    parts = urlparse(url)
    return urlunparse(parts._replace(netloc=f"{parts.username}@{parts.hostname}:{parts.port or 5432}"))


def test_flask_db_upgrade_on_a_new_database_says_which_migrations_it_applied(
        conveyor, empty_database_url):
    env = {"DATABASE_URL": empty_database_url}
    first = conveyor.flask("db", "upgrade", env=env)
    assert first.stdout == f"applied {', '.join(MIGRATIONS)}; schema at version {VERSION}\n"
    assert applied(empty_database_url) == MIGRATIONS
    again = conveyor.flask("db", "upgrade", env=env)
    assert again.stdout == f"schema is up to date (version {VERSION})\n"


def test_importing_the_app_leaves_a_new_database_unmigrated(conveyor, empty_database_url):
    subprocess.run([sys.executable, "-c", "import app"], cwd=ROOT, check=True, timeout=60,
                   env={**conveyor.env, "DATABASE_URL": empty_database_url})
    assert applied(empty_database_url) == []


def our_modules():
    """Every module a process of ours may import: the top-level ones and those of our
    packages (not the tests, benchmarks or migrations)."""
    names = [f[:-3] for f in os.listdir(ROOT) if f.endswith(".py") and f.count(".") == 1]
    for entry in os.scandir(ROOT):
        if entry.name not in ("tests", "bench", "migrations") and os.path.exists(
                os.path.join(entry.path, "__init__.py")):
            names += [entry.name] + [f"{entry.name}.{module.name}"
                                     for module in pkgutil.iter_modules([entry.path])]
    return sorted(names)


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_importing_any_module_of_ours_connects_to_nothing_and_configures_nothing(
        tmp_path, backend):
    """`import app` (which builds the app), jobs, models, cli, supervisor...: no
    connection to the database or the rate-limit storage, no file written, no logging
    set up. A process connects in its explicit start-up (boot.connect)."""
    listener = socket.create_server(("127.0.0.1", 0))  # stands in for PostgreSQL and Redis
    address = "127.0.0.1:%d" % listener.getsockname()[1]
    database = {"postgresql": f"postgresql://x@{address}/x",
                "sqlite": f"sqlite:///{tmp_path}/conveyor.db"}[backend]
    env = {**os.environ, **FAST_ENV, "PYTHONPATH": ROOT, "DATABASE_URL": database,
           "REDIS_URL": f"redis://{address}/0", "RATELIMIT_STORAGE_URI": ""}
    script = ("import importlib, logging\n"
              f"for name in {our_modules()!r}:\n"
              "    importlib.import_module(name)\n"
              "print(len(logging.getLogger().handlers))\n")
    work = tmp_path / "cwd"
    work.mkdir()
    try:
        result = subprocess.run([sys.executable, "-c", script], cwd=work, env=env,
                                capture_output=True, text=True, timeout=60)
        assert (result.returncode, result.stderr, result.stdout) == (0, "", "0\n")
        assert select.select([listener], [], [], 0)[0] == [], "something connected"
    finally:
        listener.close()
    assert sorted(os.listdir(tmp_path)) == ["cwd"] and os.listdir(work) == []


def migrate(url, up_to=None):
    """Apply this code's migrations to the database at url, all or up to the one named."""
    script = ("import sys, models\nfrom playhouse.migrations import Runner\n"
              "models.open_database(sys.argv[1])\n"
              "with models.db.obj.connection_context():\n"
              "    Runner(models.db.obj, models.MIGRATIONS_DIR).up(sys.argv[2] or None)\n")
    subprocess.run([sys.executable, "-c", script, url, up_to or ""], cwd=ROOT, check=True,
                   timeout=60)


def start(process, env, log_path):
    """web (gunicorn as the Procfile runs it) or worker (`python -m supervisor`)."""
    command = {"web": ["-m", "gunicorn", "app:app", "--bind", "127.0.0.1:0"],
               "worker": ["-m", "supervisor", "--concurrency", "1"]}[process]
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, *command], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=log)


@pytest.mark.parametrize("behind", ["new", "one migration behind"])
@pytest.mark.parametrize("process", ["web", "worker", "flask"])
def test_a_database_that_is_behind_stops_web_worker_and_commands_with_one_line(
        conveyor, empty_database_url, tmp_path, process, behind):
    """Only the release phase migrates: a process started before it (or without one)
    leaves the database as it is and exits non-zero with one line that says what to run,
    where a platform shows it (a crashed dyno's log)."""
    if behind != "new":
        migrate(empty_database_url, up_to=MIGRATIONS[-2])
    before = applied(empty_database_url)
    env = {**conveyor.env, "DATABASE_URL": empty_database_url}
    if process == "flask":
        result = conveyor.flask("jobs", "submit", "t.noop", env=env, check=False)
        code, stderr = result.returncode, result.stderr
    else:
        proc = start(process, env, tmp_path / f"{process}.log")
        try:
            code = proc.wait(60)
        finally:
            proc.kill()  # (gone already, unless it started: then the test fails)
        stderr = (tmp_path / f"{process}.log").read_text()
    lines = [line for line in stderr.splitlines() if not GUNICORN_STARTING.match(line)]
    version = int(before[-1][:4]) if before else 0
    missing = MIGRATIONS[-1] if before else f"{MIGRATIONS[0]} to {MIGRATIONS[-1]}"
    assert code == 2 and lines == [
        f"conveyor: the database {shown(empty_database_url)} is at schema version {version}, "
        f"this code needs {len(MIGRATIONS) - len(before)} more migration"
        f"{'s' if before == [] else ''} ({missing}): run `flask db upgrade` (the Procfile's "
        f"release phase) first"], stderr
    assert applied(empty_database_url) == before


def test_web_and_worker_start_on_a_migrated_database_and_say_what_they_use(
        conveyor, empty_database_url, tmp_path, monkeypatch):
    url = with_password(empty_database_url, "hunter2")
    conveyor.flask("db", "upgrade", env={"DATABASE_URL": url})
    web = Gunicorn({**conveyor.env, "DATABASE_URL": url}, tmp_path / "web.log")
    try:
        log = web.log()
        [line] = [line for line in log.splitlines() if "conveyor.boot" in line]
        assert (f"web uses {shown(empty_database_url)} (schema version {VERSION}) with job "
                f"types: ") in line
        assert "echo" in line and "t.noop" in line and "hunter2" not in log
    finally:
        web.stop()
    monkeypatch.setitem(conveyor.env, "DATABASE_URL", url)
    worker = conveyor.start_supervisor(concurrency=1)
    line = wait_for(lambda: re.search(r"^.*conveyor\.boot.*$", worker.log(), re.M),
                    timeout=30, message="the worker's start-up line").group(0)
    assert (f"worker uses {shown(empty_database_url)} (schema version {VERSION}) with job "
            f"types: ") in line
    assert "webhook.post" in line and "t.noop" in line and "hunter2" not in worker.log()
    assert applied(empty_database_url) == MIGRATIONS


def test_a_database_ahead_of_this_code_still_serves_it(conveyor, empty_database_url):
    """A deploy's release phase migrates while the previous release still runs (and starts,
    when the platform restarts one of its processes): migrations only add, so a schema
    ahead of the code is no reason to stop."""
    conveyor.flask("db", "upgrade", env={"DATABASE_URL": empty_database_url})
    future = "9999_from_the_next_release"
    if empty_database_url.startswith("sqlite"):
        with sqlite3.connect(empty_database_url[len("sqlite:///"):]) as conn:
            conn.execute("INSERT INTO schema_migration (name, applied) VALUES (?, '2030-01-01')",
                         (future,))
        conn.close()
    else:
        with psycopg2.connect(empty_database_url) as conn, conn.cursor() as cur:
            cur.execute("INSERT INTO schema_migration (name, applied) VALUES (%s, now())",
                        (future,))
        conn.close()
    submitted = conveyor.flask("jobs", "submit", "t.noop",
                               env={"DATABASE_URL": empty_database_url, "LOG_LEVEL": "debug"})
    assert submitted.stdout == "1\n"
    assert "(schema version 9999)" in submitted.stderr


def test_flask_commands_name_their_database_and_job_types_only_at_debug(conveyor):
    quiet = conveyor.flask("jobs", "list", "--json")
    assert quiet.stderr == ""
    loud = conveyor.flask("jobs", "list", "--json", env={"LOG_LEVEL": "debug"})
    assert (f"flask uses {shown(conveyor.database_url)} (schema version {VERSION}) with job "
            f"types: ") in loud.stderr
    assert json.loads(loud.stdout)["items"] == []


def test_flask_reads_settings_from_a_dotenv_file_as_honcho_does(conveyor, tmp_path):
    """HANDLER_PATHS set only in .env: `flask` knows the types there, like web and worker
    under honcho (Flask reads .env when python-dotenv is installed)."""
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / ".env").write_text(f"HANDLER_PATHS={TEST_HANDLERS}\n"
                                 f"DATABASE_URL={conveyor.database_url}\n")
    env = {name: value for name, value in conveyor.env.items()
           if name not in ("HANDLER_PATHS", "DATABASE_URL")}

    def flask(*args):
        return subprocess.run([sys.executable, "-m", "flask", "--app",
                               os.path.join(ROOT, "app.py"), *args], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=60)

    listed = flask("handlers", "--json")
    assert listed.returncode == 0, listed.stderr
    assert "t.noop" in [row["type"] for row in json.loads(listed.stdout)["items"]]
    submitted = flask("jobs", "submit", "t.noop")
    assert submitted.returncode == 0, submitted.stderr
    assert conveyor.job(int(submitted.stdout)).type == "t.noop"


def test_python_dotenv_is_a_runtime_requirement():
    """A fresh `pip install -r requirements.txt` brings it, so `flask` reads .env there too."""
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        lines = [line.split("#")[0].strip() for line in f]
    requirements = {r.name: r for r in map(Requirement, filter(None, lines))
                    if not r.name.startswith("-")}
    assert "python-dotenv" in requirements
    assert requirements["python-dotenv"].specifier.contains(
        importlib.metadata.version("python-dotenv"))


def test_flask_handlers_lists_each_job_type_with_what_its_jobs_get(conveyor):
    env = {"DEFAULT_MAX_ATTEMPTS": "7", "DEFAULT_TIMEOUT_S": "45"}
    rows = {row["type"]: row for row in
            json.loads(conveyor.flask("handlers", "--json", env=env).stdout)["items"]}

    assert rows["webhook.post"] == {
        "type": "webhook.post", "queue": "webhooks", "max_attempts": 8, "timeout_s": 60,
        "backoff_base_s": 0.05, "backoff_max_s": 0.5, "schema": True,
        "module": "handlers.webhook.post_webhook",
        "path": os.path.join(ROOT, "handlers", "webhook.py")}
    noop = rows["t.noop"]
    assert (noop["queue"], noop["max_attempts"], noop["timeout_s"], noop["schema"],
            noop["path"]) == ("default", 7, 45, False, os.path.join(TEST_HANDLERS, "testing.py"))
    assert list(rows) == sorted(rows)

    table = conveyor.flask("handlers", env=env).stdout.splitlines()
    assert table[0].split() == ["type", "queue", "attempts", "timeout", "backoff", "schema",
                                "path"]
    assert re.search(r"^t\.noop +default +7 +45s +0\.05s\.\.0\.5s +no +\S+testing\.py$",
                     "\n".join(table), re.M)
