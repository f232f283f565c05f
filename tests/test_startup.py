"""What a new user sees when the platform starts: `flask db upgrade` says what it applied,
web and worker migrate as they start and say which database and job types they use (the
`flask` commands only at debug), `flask` reads `.env` as honcho does, and `flask handlers`
lists the job types with their options."""
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
from test_config import _schema, empty_database_url  # noqa: F401 (a fixture)

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


def test_other_flask_commands_on_a_new_database_migrate_quietly_first(conveyor,
                                                                      empty_database_url):
    submitted = conveyor.flask("jobs", "submit", "t.noop",
                               env={"DATABASE_URL": empty_database_url})
    assert submitted.stdout == "1\n"
    assert "uses" not in submitted.stderr and "schema" not in submitted.stderr
    assert applied(empty_database_url) == MIGRATIONS


def test_web_migrates_a_new_database_as_it_starts_and_says_what_it_uses(
        conveyor, empty_database_url, tmp_path):
    url = with_password(empty_database_url, "hunter2")
    web = Gunicorn({**conveyor.env, "DATABASE_URL": url}, tmp_path / "web.log")
    try:
        log = web.log()
        assert applied(empty_database_url) == MIGRATIONS
        [line] = [line for line in log.splitlines() if "conveyor.boot" in line]
        assert (f"web uses {shown(empty_database_url)} (schema version {VERSION}, applied "
                f"{', '.join(MIGRATIONS)}) with job types: ") in line
        assert "echo" in line and "t.noop" in line and "hunter2" not in log
    finally:
        web.stop()


def test_worker_migrates_a_new_database_as_it_starts_and_says_what_it_uses(
        conveyor, empty_database_url, monkeypatch):
    url = with_password(empty_database_url, "hunter2")
    monkeypatch.setitem(conveyor.env, "DATABASE_URL", url)
    worker = conveyor.start_supervisor(concurrency=1)
    line = wait_for(lambda: re.search(r"^.*conveyor\.boot.*$", worker.log(), re.M),
                    timeout=30, message="the worker's start-up line").group(0)
    assert (f"worker uses {shown(empty_database_url)} (schema version {VERSION}, applied "
            f"{', '.join(MIGRATIONS)}) with job types: ") in line
    assert "webhook.post" in line and "t.noop" in line and "hunter2" not in worker.log()
    assert applied(empty_database_url) == MIGRATIONS


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
