"""Peewee models and the database connection.

One database for every process, chosen by DATABASE_URL: SQLite (WAL, busy timeout) by
default, PostgreSQL for production. Times are stored as UTC epoch seconds (float) and
read from the database's clock (`now()`), so hosts with skewed clocks agree on leases.
"""
import collections
import hashlib
import itertools
import json
import logging
import math
import os
import re
import select

import peewee as pw
import psycopg2.extensions
from playhouse.db_url import connect as connect_url, register_database

db = pw.DatabaseProxy()
log = logging.getLogger("conveyor.db")

MIGRATIONS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached; the message is one line naming it and why."""


# How every PostgreSQL connection reaches the server (the LISTEN connection's too).
LINK_PARAMS = dict(connect_timeout=5, keepalives=1, keepalives_idle=5, keepalives_interval=2,
                   keepalives_count=3, application_name="conveyor")


def open_database(url, lease_s=None, custom_plans=False, pool_mode="session"):
    """Point `db` at the database named by url (no connection is made yet).

    custom_plans (PostgreSQL): plan each prepared statement for its parameters and the
    tables as they are now, never with a generic plan. The worker's step joins `jobs` and
    `attempts`; a generic plan chosen while they were small (a scan of the whole table)
    would stay cached as they grow, until the next ANALYZE. Submission is planned once
    (generic), which is where most of its planning cost went.

    On PostgreSQL the lease bounds two waits a partition would otherwise make endless:
    the server ends a session idle inside an open transaction for longer (so the row locks
    of a cut-off or stalled process cannot keep the reaper from handing its job to another
    worker), and the client gives up on a query whose packets go unacknowledged for longer
    (tcp_user_timeout) instead of waiting for TCP's own retries, some 15 minutes.

    pool_mode "transaction": url is a pooler (pgbouncer) that hands each transaction to
    any of its server sessions. A session's settings would then be another client's, and
    the pooler refuses (or drops) the startup options that carry them: each transaction
    sets them for itself instead (SET LOCAL in its BEGIN, no round trip more), and
    statements are not prepared (a statement prepared in one session is unknown in the
    next; unprepared, each is planned for its parameters, as custom_plans asks).

    Otherwise whether its sessions keep prepared statements is not known yet: execute()
    prepares them again until it finds otherwise (see prepares_statements).
    """
    global _preparing
    _preparing = pool_mode != "transaction"
    if url.startswith("sqlite"):
        database = connect_url(url, pragmas={
            "journal_mode": "wal",
            "busy_timeout": 30_000,
            "synchronous": "full",
        }, timeout=30, lock_type="IMMEDIATE")  # every transaction takes the write lock up front
    else:
        database = _postgres(url, connection_factory=PreparingConnection, **LINK_PARAMS)
        session = {}
        if lease_s:
            lease_ms = math.ceil(lease_s * 1000)
            database.connect_params["tcp_user_timeout"] = lease_ms
            session["idle_in_transaction_session_timeout"] = str(lease_ms)
        if custom_plans:
            session["plan_cache_mode"] = "force_custom_plan"
        database.session_settings = session
        if pool_mode == "transaction":
            database.begin_statement = "; ".join(
                ["BEGIN"] + [f"SET LOCAL {name} = '{value}'" for name, value in session.items()])
        elif session:
            given = database.connect_params.get("options")
            database.connect_params["options"] = " ".join(
                ([given] if given else [])
                + [f"-c {name}={value}" for name, value in session.items()])
    db.initialize(database)
    return database


class PreparingConnection(psycopg2.extensions.connection):
    """A psycopg2 connection that remembers which statements its session has prepared, and
    tells without a round trip whether the server has ended its session."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prepared = {}  # SQL text -> the name of its prepared statement
        self._socket = select.poll()
        self._socket.register(self.fileno(), select.POLLIN)

    def ended(self):
        """Whether the server has ended this idle session. The server sends nothing to an
        idle session it keeps (no LISTEN on these), so anything to read means its end: the
        FATAL message and end of file of a terminated backend (a restart, a failover,
        pg_terminate_backend, a timeout), or the error of a connection TCP keepalives found
        dead. Nothing to read costs one poll(2), not a round trip."""
        return self.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE \
            and bool(self._socket.poll(0))


class PostgresqlDatabase(pw.PostgresqlDatabase):
    """PostgreSQL whose connection (one per thread) is replaced before use once the server
    has ended its session. Otherwise, after a database restart, each thread's first
    statement would fail on its dead connection, however long ago the database came back
    (a request answered 503, a worker's claim or heartbeat failed).

    Only an idle connection is replaced: one inside a transaction (or in its COMMIT) must
    fail, so that what it did is never silently lost with the session.

    Behind a transaction pooler its BEGIN also sets the session's settings for the
    transaction (see open_database)."""

    session_settings = {}  # name -> value the sessions must have (options or SET LOCAL)
    begin_statement = "BEGIN"

    def begin(self, isolation_level=None):
        if isolation_level is not None or self.begin_statement == "BEGIN":
            return super().begin(isolation_level)
        with pw.__exception_wrapper__:
            self.cursor().execute(self.begin_statement)

    def connection(self):
        self._replace_if_ended()
        return super().connection()

    def cursor(self, *args, **kwargs):
        self._replace_if_ended()
        return super().cursor(*args, **kwargs)

    def _replace_if_ended(self):
        connection = self._state.conn
        if connection is not None and connection.ended():
            log.info("the database ended this connection; opening a new one")
            reset_connection()


register_database(PostgresqlDatabase, "postgresql")


def _postgres(url, **params):
    """The PostgresqlDatabase of a PostgreSQL DATABASE_URL, with params over the URL's own.

    A URL of one host is read by playhouse's db_url. What only libpq reads, a URL of
    several hosts (`postgresql://a:5432,b:5432/db?target_session_attrs=read-write`) or a
    key=value string (`host=a,b dbname=db`), libpq parses itself into the same keywords
    (host="a,b", port="5432,5432"...), so that every connection, the supervisor's LISTEN
    one too, is made from them and libpq picks the host at each connection: after a
    failover, the next connection goes to the promoted server."""
    if not _several_hosts(url) and "://" in url:
        return connect_url(url.replace("postgres://", "postgresql://", 1), **params)
    given = psycopg2.extensions.parse_dsn(url)
    return PostgresqlDatabase(given.pop("dbname", None), **{**given, **params})


def _several_hosts(url):
    """Whether a PostgreSQL URL names several hosts (libpq tries them in turn)."""
    netloc = url.partition("://")[2].partition("/")[0].rpartition("@")[2]
    return "," in netloc


# A placeholder as execute() takes them: %s, or %(name)s for a dict of parameters.
_PLACEHOLDER = re.compile(r"%(?:(s)|\((\w+)\)s|%)")


def statement_name(sql):
    """The name under which execute() prepares sql: the same in every process, so that
    pg_prepared_statements, logs and the fault tests can tell which statement runs."""
    return "conveyor_" + hashlib.sha1(sql.encode()).hexdigest()[:16]


# The server-side errors of a connection that does not keep its prepared statements: one
# whose transactions each go to another server session (a transaction-pooling pgbouncer).
_LOST_STATEMENT = {"26000", "42P05"}  # invalid_sql_statement_name, duplicate_prepared_statement
_preparing = True


def execute(sql, params=()):
    """db.execute_sql for the statements run on every job or request. On PostgreSQL the
    statement is prepared once per connection (PREPARE, which outlives transactions) and
    then only EXECUTEd, so the server does not parse and plan it again on each call:
    that cost as much as running the statements that submit and claim jobs. `sql` takes
    %s placeholders with a sequence of parameters, or %(name)s with a dict, as execute_sql
    does.

    Behind a pooler that hands each transaction to another server session, a statement
    prepared in one is unknown in the next (or already known, prepared by another
    client): then this process stops preparing, says so once, and runs the statement
    again as it is, unless a transaction was open (its caller sees the error)."""
    global _preparing
    if not _preparing or not is_postgres():
        return db.execute_sql(sql, params)
    connection = db.connection()
    try:
        prepared = connection.prepared.get(sql)
        if prepared is None:
            prepared = connection.prepared[sql] = _prepare(sql)
        name, names = prepared
        values = params if names is None else [params[n] for n in names]  # $1, $2... in order
        arguments = f"({', '.join(['%s'] * len(values))})" if values else ""
        return db.execute_sql(f"EXECUTE {name}{arguments}", values)
    except DB_ERRORS as exc:
        if getattr(exc.__context__, "pgcode", None) not in _LOST_STATEMENT:
            raise
        if db.connection() is not connection:  # the server ended it between PREPARE and EXECUTE
            return execute(sql, params)
        _preparing = False
        log.warning("the database session does not keep prepared statements (a pooler in "
                    "transaction mode?): running statements unprepared from now on")
        if db.in_transaction():
            raise
        return db.execute_sql(sql, params)


def _prepare(sql):
    """PREPARE sql on this connection; (its name, the names of its parameters in order, or
    None when it takes %s placeholders)."""
    name, numbers, names = statement_name(sql), itertools.count(1), {}

    def number(match):
        if match[1]:
            return f"${next(numbers)}"
        if match[2]:
            if match[2] not in names:
                names[match[2]] = f"${len(names) + 1}"
            return names[match[2]]
        return match[0]

    db.execute_sql(f"PREPARE {name} AS {_PLACEHOLDER.sub(number, sql)}", ())
    return name, list(names) if names else None


def prepares_statements():
    """Whether execute() still prepares statements: False once the database's sessions were
    found not to keep them (behind a transaction-pooling pgbouncer)."""
    return _preparing and is_postgres()


def is_postgres():
    return isinstance(db.obj, pw.PostgresqlDatabase)


def in_transaction():
    """Whether this thread's connection is inside a transaction, peewee's or not (on
    PostgreSQL, as the session itself says, without a round trip)."""
    if is_postgres():
        status = db.connection().get_transaction_status()
        return status != psycopg2.extensions.TRANSACTION_STATUS_IDLE
    return db.in_transaction()


def now():
    """The database's clock as epoch seconds, as an SQL expression."""
    if is_postgres():
        return pw.SQL("extract(epoch from clock_timestamp())::float8")
    return pw.SQL("((julianday('now') - 2440587.5) * 86400.0)")


_POOLER_HINT = ("; behind a transaction-pooling pgbouncer set DATABASE_POOL_MODE=transaction "
                "(and LISTEN_DATABASE_URL to the database itself)")


def check_connection():
    """Raise DatabaseUnavailable with one line when the database cannot be reached, or when
    a transaction there lacks the settings open_database gave its sessions (a pooler that
    drops the startup options which carry them: the lease would no longer bound a
    partitioned session)."""
    wanted = getattr(db.obj, "session_settings", {})
    try:
        db.connect(reuse_if_open=True)
        if wanted:
            with db.atomic():  # where a pooler's transactions get them
                found = dict(db.execute_sql(
                    "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                    (list(wanted),)).fetchall())
        else:
            db.execute_sql("SELECT 1")
    except pw.DatabaseError as exc:
        said = reason(exc)
        hint = _POOLER_HINT if "unsupported startup parameter" in said else ""
        raise DatabaseUnavailable(
            f"cannot reach the database ({describe()}): {said}{hint}") from None
    lacking = [f"{name} is {found.get(name)!r}, not {value!r}"
               for name, value in wanted.items() if found.get(name) != value]
    if lacking:
        raise DatabaseUnavailable(f"the database ({describe()}) did not apply the session "
                                  f"settings Conveyor asked for ({', '.join(lacking)})"
                                  f"{_POOLER_HINT}")


def reason(exc):
    """What a database error says, on one line. With several hosts, libpq says why each
    one it tried failed, a line each ("connection to server at ..., port 5432 failed:
    session is read-only"): all of them, not only the first host's."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    tried = [line for line in lines if line.startswith("connection to server")]
    return "; ".join(tried) if len(tried) > 1 else (lines or [type(exc).__name__])[0]


def reset_connection():
    """Drop this thread's connection after an error; the next query opens a new one."""
    try:
        db.close()
    except Exception:  # closing a broken connection may itself fail; the state is reset anyway
        pass


DB_ERRORS = (pw.DatabaseError, pw.InterfaceError)


def describe():
    """Where the database is, as a URL without the password: the SQLite file's full path
    (a relative DATABASE_URL depends on the folder a process starts in)."""
    database = db.obj
    if isinstance(database, pw.SqliteDatabase):
        path = database.database
        return f"sqlite:///{path if path == ':memory:' else os.path.abspath(path)}"
    params = database.connect_params
    user = f"{params['user']}@" if params.get("user") else ""
    hosts = str(params.get("host", "localhost")).split(",")
    ports = str(params.get("port", 5432)).split(",")
    ports = ports * len(hosts) if len(ports) == 1 else ports  # one port for every host
    where = ",".join(f"{host}:{port}" for host, port in zip(hosts, ports))
    return f"postgresql://{user}{where}/{database.database}"


Schema = collections.namedtuple("Schema", "applied version")


class SchemaBehind(RuntimeError):
    """The database lacks migrations this code needs; the message is one line naming
    `flask db upgrade`."""


def upgrade():
    """Create or migrate the schema (`flask db upgrade`, the Procfile's release phase);
    safe when several run at once.

    PostgreSQL serialises migrators on an advisory lock, SQLite on its write lock
    (BEGIN IMMEDIATE); each migration is recorded by name, so a second runner finds
    nothing left to do. Returns Schema: the names this call applied, in order, and the
    schema's version (the number of the latest migration applied, by anyone).
    """
    from playhouse.migrations import Runner

    database = db.obj
    with database.connection_context(), database.atomic():
        if is_postgres():
            database.execute_sql("SELECT pg_advisory_xact_lock(%s)", (0x636F6E76,))
        runner = Runner(database, MIGRATIONS_DIR)
        applied = runner.up()
        return Schema(applied, _version(runner.status()))


def check_schema():
    """The schema's version when every migration of this code is applied, else
    SchemaBehind; changes nothing. Web, worker and the other commands start only on a
    migrated database: migrating is the release phase's, once per deploy. A database
    ahead of this code (a newer release migrated it while this one still runs) is fine:
    migrations only add."""
    from playhouse.migrations import Runner

    with db.obj.connection_context():
        status = Runner(db.obj, MIGRATIONS_DIR).status()
    pending = [m.name for m in status if not m.applied and m.path is not None]
    if pending:
        missing = pending[0] if len(pending) == 1 else f"{pending[0]} to {pending[-1]}"
        raise SchemaBehind(
            f"the database {describe()} is at schema version {_version(status)}, this code "
            f"needs {len(pending)} more migration{'s' if len(pending) > 1 else ''} "
            f"({missing}): run `flask db upgrade` (the Procfile's release phase) first")
    return _version(status)


def _version(status):
    """The number of the latest migration applied, by anyone."""
    return max((m.idx for m in status if m.applied), default=0)


class JSONField(pw.TextField):
    def db_value(self, value):
        return None if value is None else json.dumps(value, separators=(",", ":"))

    def python_value(self, value):
        return None if value is None else json.loads(value)


class BaseModel(pw.Model):
    class Meta:
        database = db
        legacy_table_names = False


def loaded(model, data):
    """A model instance as if read from the database (nothing to save), from its column
    values: for rows a hot path reads or writes with SQL of its own."""
    instance = model(__no_default__=True)
    instance.__data__ = data
    return instance


class Job(BaseModel):
    id = pw.BigAutoField()
    type = pw.TextField()
    queue = pw.TextField()
    payload = JSONField()
    priority = pw.IntegerField(default=0)
    run_at = pw.DoubleField()
    max_attempts = pw.IntegerField()
    timeout_s = pw.DoubleField()
    backoff_base_s = pw.DoubleField()
    backoff_max_s = pw.DoubleField()
    status = pw.TextField()
    attempt = pw.IntegerField(default=0)
    attempt_base = pw.IntegerField(default=0)  # attempts spent before the last DLQ retry
    idempotency_key = pw.TextField(null=True)
    request_hash = pw.TextField(null=True)
    api_key_id = pw.BigIntegerField(null=True)
    result = JSONField(null=True)
    last_error = pw.TextField(null=True)
    dead_reason = pw.TextField(null=True)
    created_at = pw.DoubleField()
    started_at = pw.DoubleField(null=True)
    finished_at = pw.DoubleField(null=True)
    lease_owner = pw.TextField(null=True)
    heartbeat_at = pw.DoubleField(null=True)
    cancel_requested_at = pw.DoubleField(null=True)
    group_key = pw.TextField(null=True)  # the job's `group` (SPEC §11)
    held = pw.BooleanField(default=False)  # under a limit, or in a paused queue (SPEC §11)
    parent_id = pw.BigIntegerField(null=True)  # made by this job's ctx.enqueue (SPEC §12)
    unique_key = pw.TextField(null=True)
    unique_while = pw.TextField(null=True)  # queued | active
    unique_hold = pw.TextField(null=True)  # unique_key while the job holds it
    expires_at = pw.DoubleField(null=True)
    cancel_reason = pw.TextField(null=True)  # "expired"
    has_callback = pw.BooleanField(default=False)  # a callbacks row waits for its end
    progress = JSONField(null=True)  # the handler's latest ctx.progress (SPEC §12)

    class Meta:
        table_name = "jobs"


class Attempt(BaseModel):
    id = pw.BigAutoField()
    job_id = pw.BigIntegerField()
    number = pw.IntegerField()
    status = pw.TextField()
    worker_id = pw.TextField()
    host = pw.TextField(null=True)
    pid = pw.IntegerField(null=True)
    started_at = pw.DoubleField()
    finished_at = pw.DoubleField(null=True)
    error_type = pw.TextField(null=True)
    error_message = pw.TextField(null=True)
    traceback = pw.TextField(null=True)
    fenced = pw.BooleanField(default=False)

    class Meta:
        table_name = "attempts"


class Step(BaseModel):
    job_id = pw.BigIntegerField()
    name = pw.TextField()
    result = JSONField(null=True)
    attempt = pw.IntegerField()
    created_at = pw.DoubleField()

    class Meta:
        table_name = "steps"
        primary_key = pw.CompositeKey("job_id", "name")


class Worker(BaseModel):
    id = pw.TextField(primary_key=True)
    supervisor_id = pw.TextField()
    host = pw.TextField()
    pid = pw.IntegerField()
    queues = JSONField()
    started_at = pw.DoubleField()
    last_heartbeat_at = pw.DoubleField()

    class Meta:
        table_name = "workers"


class ApiKey(BaseModel):
    """An API key: only its SHA-256 is stored; revoked keys stay for the record."""
    id = pw.BigAutoField()
    name = pw.TextField()
    key_hash = pw.TextField(unique=True)
    role = pw.TextField()
    rate_limit = pw.TextField(null=True)  # None: the RATE_LIMIT default
    created_at = pw.DoubleField()
    revoked_at = pw.DoubleField(null=True)
    callback_secret = pw.TextField(null=True)  # signs its jobs' callbacks (every key has one)

    class Meta:
        table_name = "api_keys"


class Callback(BaseModel):
    """A job's callback (SPEC §12): due once the job ends (a trigger of migration 0011
    sets due_at and ended_at), delivered by a supervisor under a lease."""
    job_id = pw.BigIntegerField(primary_key=True)
    url = pw.TextField()
    status = pw.TextField(default="pending")  # pending, delivered, failed
    attempts = pw.IntegerField(default=0)
    last_error = pw.TextField(null=True)
    due_at = pw.DoubleField(null=True)  # None until the job ends
    ended_at = pw.DoubleField(null=True)
    lease = pw.TextField(null=True)  # who delivers it now; due_at is then the lease's end
    delivered_at = pw.DoubleField(null=True)

    class Meta:
        table_name = "callbacks"


class Schedule(BaseModel):
    name = pw.TextField(primary_key=True)
    cron = pw.TextField()
    type = pw.TextField()
    payload = JSONField()
    queue = pw.TextField(null=True)
    priority = pw.IntegerField(default=0)
    timezone = pw.TextField(default="UTC")
    overlap = pw.TextField(default="skip")
    paused = pw.BooleanField(default=False)
    next_run_at = pw.DoubleField()
    created_at = pw.DoubleField()
    updated_at = pw.DoubleField()

    class Meta:
        table_name = "schedules"


class ScheduleRun(BaseModel):
    id = pw.BigAutoField()
    schedule_name = pw.TextField()
    slot = pw.DoubleField()
    outcome = pw.TextField()
    job_id = pw.BigIntegerField(null=True)
    reason = pw.TextField(null=True)
    created_at = pw.DoubleField()

    class Meta:
        table_name = "schedule_runs"


class QueueSetting(BaseModel):
    """What an operator set on a queue (SPEC §11); a queue without a row has no settings."""
    name = pw.TextField(primary_key=True)
    paused = pw.BooleanField(default=False)
    concurrency = pw.IntegerField(null=True)
    rate_count = pw.IntegerField(null=True)
    rate_period_s = pw.DoubleField(null=True)
    updated_at = pw.DoubleField()

    class Meta:
        table_name = "queues"


class MetricCounter(BaseModel):
    process_id = pw.TextField()
    name = pw.TextField()
    labels = pw.TextField()  # canonical JSON of the label values
    value = pw.DoubleField()
    updated_at = pw.DoubleField()

    class Meta:
        table_name = "metric_counters"
        primary_key = pw.CompositeKey("process_id", "name", "labels")
