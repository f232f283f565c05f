"""Start-up: several `flask db upgrade` creating the schema of an empty database at once,
and bad configuration stopping web (gunicorn), `python -m supervisor` and the `flask`
commands with one clear line."""
import os
import re
import sqlite3
import subprocess
import sys
import uuid

import psycopg2
import pytest

from conftest import FAST_ENV, ROOT, TEST_HANDLERS, create_pg_database, drop_pg_database

TABLES = {"jobs", "attempts", "steps", "workers", "schema_migration"}


@pytest.fixture
def empty_database_url(conveyor):
    """A database nothing has touched yet, on the backend of this test's parameter."""
    if not conveyor.is_postgres:
        yield f"sqlite:///{conveyor.tmp_path}/empty.db"
        return
    name = f"conveyor_empty_{uuid.uuid4().hex[:12]}"
    url = create_pg_database(name)
    yield url
    drop_pg_database(name)


def _schema(url):
    """(tables, applied migrations, unique indexes on jobs and attempts) of a database."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url[len("sqlite:///"):])
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        indexes = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")]
    else:
        conn = psycopg2.connect(url)
        cur = conn.cursor()
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        tables = {r[0] for r in cur.fetchall()}
        cur.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")
        indexes = [r[0] for r in cur.fetchall()]
    cur = conn.cursor()
    cur.execute("SELECT name FROM schema_migration ORDER BY id")
    applied = [r[0] for r in cur.fetchall()]
    conn.close()
    return tables, applied, indexes


def test_concurrent_flask_db_upgrade_on_an_empty_database_applies_each_migration_once(
        conveyor, empty_database_url, tmp_path):
    """The release phase run by several deploys at once: six `flask db upgrade`, loaded and
    waiting at a barrier, start at the same instant. PostgreSQL serialises them on an
    advisory lock, SQLite on its write lock: one applies every migration, the others find
    nothing left to do, and none fails."""
    env = {**conveyor.env, "DATABASE_URL": empty_database_url}
    go = tmp_path / "go"
    upgrader = ("import os, sys, time\nfrom flask.cli import main\n"
                f"while not os.path.exists({str(go)!r}): time.sleep(0.001)\n"
                "sys.argv = ['flask', 'db', 'upgrade']\n"
                "main()\n")
    processes = [subprocess.Popen([sys.executable, "-c", upgrader], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(6)]
    go.touch()
    outcomes = [(p.wait(90), *p.communicate()) for p in processes]

    migrations = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "migrations"))
                        if f[:1].isdigit() and f.endswith(".py"))
    version = int(migrations[-1][:4])
    for code, out, err in outcomes:
        assert (code, err) == (0, ""), out + err
    assert sorted(out for _, out, _ in outcomes) == sorted(
        [f"applied {', '.join(migrations)}; schema at version {version}\n"]
        + [f"schema is up to date (version {version})\n"] * 5)
    tables, applied, indexes = _schema(empty_database_url)
    assert TABLES <= tables
    assert applied == migrations, "each migration must be applied exactly once, in order"
    assert len(indexes) == len(set(indexes))
    assert {"jobs_claim", "jobs_idempotency"} <= set(indexes)
    job_id = conveyor.flask("jobs", "submit", "t.noop",
                            env={"DATABASE_URL": empty_database_url}).stdout.strip()
    assert job_id == "1"


def _handler_folder(tmp_path, name, files):
    folder = tmp_path / name
    folder.mkdir()
    for filename, text in files.items():
        (folder / filename).write_text(text)
    return str(folder)


DUPLICATE = ('from handlers import handler\n\n'
             '@handler("{name}")\ndef {fn}(payload, ctx):\n    pass\n')

BAD_CONFIGURATIONS = {
    "concurrency not a number": (lambda tmp: {"WORKER_CONCURRENCY": "abc"},
                                 ["WORKER_CONCURRENCY", "'abc'"]),
    "negative grace": (lambda tmp: {"SHUTDOWN_GRACE_S": "-1"}, ["SHUTDOWN_GRACE_S"]),
    "lease not above two heartbeats": (lambda tmp: {"HEARTBEAT_S": "1", "LEASE_S": "2"},
                                       ["LEASE_S", "HEARTBEAT_S"]),
    "unknown log format": (lambda tmp: {"LOG_FORMAT": "xml"}, ["LOG_FORMAT", "xml"]),
    "malformed outbound allow-list": (lambda tmp: {"OUTBOUND_ALLOW": "127.0.0.1,10.0.0.0/33"},
                                      ["OUTBOUND_ALLOW", "10.0.0.0/33"]),
    "a proxy that is not an address": (lambda tmp: {"TRUSTED_PROXIES": "10.0.0.1,nginx"},
                                       ["TRUSTED_PROXIES", "'nginx'"]),
    "unreachable database": (
        lambda tmp: {"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x"},
        ["database", "127.0.0.1:1"]),
    "handler with a syntax error": (
        lambda tmp: {"HANDLER_PATHS": TEST_HANDLERS + ":" + _handler_folder(
            tmp, "broken", {"billing_broken.py": "def charge(:\n    pass\n"})},
        ["billing_broken.py", "syntax error"]),
    "two handlers for one type": (
        lambda tmp: {"HANDLER_PATHS": _handler_folder(tmp, "twice", {
            "first.py": DUPLICATE.format(name="dup.type", fn="one"),
            "second.py": DUPLICATE.format(name="dup.type", fn="two")})},
        ["'dup.type'", "first", "second"]),
    "a handler taking an existing type": (
        lambda tmp: {"HANDLER_PATHS": TEST_HANDLERS + ":" + _handler_folder(
            tmp, "taker", {"taker.py": DUPLICATE.format(name="t.noop", fn="noop")})},
        ["'t.noop'", "taker"]),
}


# gunicorn says it is starting before its on_starting hook, where web checks the database.
GUNICORN_STARTING = re.compile(r"^\[[^]]+\] \[\d+\] \[INFO\] Starting gunicorn ")


@pytest.mark.parametrize("entry_point", ["web", "supervisor", "flask"])
@pytest.mark.parametrize("case", list(BAD_CONFIGURATIONS))
def test_bad_configuration_stops_the_process_with_one_line(conveyor, tmp_path, case,
                                                           entry_point):
    make_env, mentions = BAD_CONFIGURATIONS[case]
    env = {**conveyor.env, **make_env(tmp_path)}
    command = {"web": ["-m", "gunicorn", "app:app", "--bind", "127.0.0.1:0"],
               "supervisor": ["-m", "supervisor", "--concurrency", "1"],
               "flask": ["-m", "flask", "jobs", "list"]}[entry_point]

    result = subprocess.run([sys.executable, *command], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)

    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if not GUNICORN_STARTING.match(line)]
    assert len(lines) == 1 and lines[0].strip(), f"want one line on stderr, got:\n{result.stderr}"
    for needle in mentions:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert result.stdout == ""


def test_settings_refuse_each_bad_value():
    from infra import config
    base = {**FAST_ENV, "DATABASE_URL": "sqlite:///x.db", "HANDLER_PATHS": ""}
    for name, value in [("WORKER_CONCURRENCY", "0"), ("HEARTBEAT_S", "0"), ("LEASE_S", "nan"),
                        ("PORT", "-5"), ("DEFAULT_MAX_ATTEMPTS", "1.5"),
                        ("POLL_INTERVAL_S", "inf"), ("LOG_LEVEL", "loud"),
                        ("DATABASE_URL", "mysql://x"), ("RATE_LIMIT", "lots"),
                        ("BACKOFF_MAX_S", "0.01"), ("HANDLER_PATHS", "/no/such/folder"),
                        ("OUTBOUND_ALLOW", "10.0.0.256"),
                        ("TRUSTED_PROXIES", "10.0.0.0/33"), ("REDIS_URL", "http://cache"),
                        ("RATE_LIMIT_ON_STORAGE_ERROR", "maybe"),
                        ("DATABASE_POOL_MODE", "statement"),
                        ("LISTEN_DATABASE_URL", "redis://127.0.0.1/0"),
                        ("LISTEN_DATABASE_URL", "postgresql://db/conveyor")]:  # SQLite
        with pytest.raises(config.ConfigError, match=name):
            config.Settings.from_env({**base, name: value})
    assert config.Settings.from_env(base).lease_s == float(FAST_ENV["LEASE_S"])
    assert os.path.isdir(TEST_HANDLERS)


def test_rate_limits_are_counted_in_redis_url_unless_ratelimit_storage_uri_says_otherwise():
    from infra import config
    base = {**FAST_ENV, "DATABASE_URL": "sqlite:///x.db", "HANDLER_PATHS": ""}
    defaults = config.Settings.from_env(base)
    assert (defaults.ratelimit_storage_uri, defaults.rate_limit_on_storage_error,
            defaults.trusted_proxies) == ("memory://", "closed", ())
    platform = {**base, "REDIS_URL": "rediss://:secret@cache.example:6380"}
    assert config.Settings.from_env(platform).ratelimit_storage_uri == platform["REDIS_URL"]
    chosen = {**platform, "RATELIMIT_STORAGE_URI": "redis://limits.example:6379/1"}
    assert config.Settings.from_env(chosen).ratelimit_storage_uri == "redis://limits.example:6379/1"
    proxies = config.Settings.from_env({**base, "TRUSTED_PROXIES": " 10.0.0.0/8, ::1 ,"})
    assert [str(network) for network in proxies.trusted_proxies] == ["10.0.0.0/8", "::1/128"]


def test_listen_database_url_defaults_to_database_url():
    from infra import config
    base = {**FAST_ENV, "DATABASE_URL": "postgresql://pooler:6432/conveyor", "HANDLER_PATHS": ""}
    defaults = config.Settings.from_env(base)
    assert (defaults.listen_database_url, defaults.database_pool_mode) == (
        "postgresql://pooler:6432/conveyor", "session")
    pooled = config.Settings.from_env({**base, "DATABASE_POOL_MODE": "Transaction",
                                       "LISTEN_DATABASE_URL": "postgres://db:5432/conveyor"})
    assert (pooled.listen_database_url, pooled.database_pool_mode) == (
        "postgres://db:5432/conveyor", "transaction")
    standby = "host=db-a,db-b dbname=conveyor target_session_attrs=read-write"
    assert config.Settings.from_env({**base, "LISTEN_DATABASE_URL": standby}) \
        .listen_database_url == standby
    with pytest.raises(config.ConfigError, match="LISTEN_DATABASE_URL names no database"):
        config.Settings.from_env({**base, "LISTEN_DATABASE_URL": "host=db-a,db-b"})
