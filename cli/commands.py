"""The `flask` commands (the README's Command line table): db, keys, jobs, dlq, schedules,
queues, prune and audit, and the operator's views: `jobs wait`, `top` and `handlers`.

Thin callers of the core, like the routes. Refusals print one line (`Error: ...`) and
exit non-zero; commands that show or list take --json for one JSON document on stdout.
"""
import inspect
import json
import logging
import re
import signal
import time

import click
from flask.cli import AppGroup

from core import audit
from core import keys
from infra import boot
from core import documents
import handlers
from core import jobs
from core import history
from core import status as statuses
from core import submission
from core import workers as registry
import models
from core import queues
from core import schedules
from core import selection
from infra.config import ConfigError, fail_fast, settings
from core.errors import Refused

class Duration(click.ParamType):
    """The one reading of every time option: seconds as a plain number (60, 0.5) or with a
    unit (90s, 15m, 12h, 7d). A bad value is one `Error:` line and exit 1, like every other
    refusal here, rather than click's usage block."""

    name = "duration"
    PATTERN = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smhd]?)")
    UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

    def __init__(self, minimum=0.0):
        self.minimum = minimum

    def convert(self, value, param, ctx):
        match = self.PATTERN.fullmatch(str(value).strip())
        if not match:
            raise click.ClickException(f"{param.opts[0]}: {value!r} is not a duration: "
                                       f"seconds (60, 0.5) or 90s, 15m, 12h, 7d")
        seconds = float(match[1]) * self.UNITS[match[2]]
        if seconds < self.minimum:
            raise click.ClickException(f"{param.opts[0]}: {value!r} is less than "
                                       f"{self.minimum:g}s")
        return seconds


class Conveyor:
    """What every command here does around its work: start the process (boot.connect: the
    app connected to nothing; an unreachable database stops it with one line), check that
    the schema is up to date (else stop with one line naming `flask db upgrade`, which
    alone migrates), and answer a refusal from the core with one clear line (`Error: ...`,
    exit 1), not a traceback."""

    checks_schema = True

    def invoke(self, ctx):
        try:
            boot.connect(settings())
            if self.checks_schema:
                boot.ready("flask", level=logging.DEBUG)
        except ConfigError as exc:
            fail_fast(exc)
        try:
            return super().invoke(ctx)
        except Refused as exc:
            details = f" ({'; '.join(exc.errors)})" if exc.errors else ""
            raise click.ClickException(f"{exc.detail}{details}") from None


class Commands(Conveyor, AppGroup):
    """A command group of Conveyor's."""


class Command(Conveyor, click.Command):
    """A command of Conveyor's outside any group."""


class SchemaCommands(Commands):
    """`flask db`: its commands manage the schema themselves."""

    checks_schema = False


def json_object(text, option="--payload"):
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint=option) from None
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint=option)
    return value


def echo_fields(document, width):
    """One `name: value` line per field of document, objects and lists as JSON."""
    for name, value in document.items():
        shown = json.dumps(value) if isinstance(value, (dict, list)) else value
        click.echo(f"{name:>{width}}: {'' if shown is None else shown}")


def rules():
    """How this process checks and completes a job (core.submission.Rules)."""
    return submission.Rules.from_settings(settings())


def emit(document):
    click.echo(json.dumps(document, indent=2))


db_group = SchemaCommands("db", help="Manage the database schema.")
jobs_group = Commands("jobs", help="Submit, show and list jobs.")
dlq_group = Commands("dlq", help="The dead-letter queue.")
schedules_group = Commands("schedules", help="Recurring jobs on a cron schedule.")
queues_group = Commands("queues", help="Pause, resume and limit queues.")


@db_group.command("upgrade")
def db_upgrade():
    """Create or migrate the schema (the Procfile's release phase; idempotent, and safe
    when several run at once)."""
    schema = models.upgrade()
    click.echo(f"applied {', '.join(schema.applied)}; schema at version {schema.version}"
               if schema.applied else f"schema is up to date (version {schema.version})")


@jobs_group.command("submit")
@click.argument("type")
@click.option("--payload", default="{}", help="The payload, a JSON object.")
@click.option("--queue")
@click.option("--priority", type=int)
@click.option("--delay", "delay_s", type=Duration(),
              help="How long from now to run it: seconds, or 90s, 15m, 12h, 7d.")
@click.option("--run-at", help="When to run it, RFC 3339 with an offset.")
@click.option("--max-attempts", type=int)
@click.option("--timeout", "timeout_s", type=Duration(),
              help="How long an attempt may run: seconds, or 90s, 15m, 12h.")
@click.option("--idempotency-key")
@click.option("--group", help="What the type's group_concurrency counts by (a customer id, say).")
@click.option("--unique-key", help="While a job of this type holds the key, print its id instead.")
@click.option("--unique-while", type=click.Choice(submission.UNIQUE_WHILE),
              help="How long the key is held: while the job waits (queued, the default) or "
                   "until it ends (active).")
@click.option("--ttl", "ttl_s", type=Duration(),
              help="Not started within this (seconds, or 90s, 15m, 12h), it never starts.")
@click.option("--callback-url", help="Where the job's document is POSTed, signed, once it ends.")
def jobs_submit(type, payload, **options):
    """Submit a job; prints its id."""
    body = {"type": type, "payload": json_object(payload)}
    body.update({name: value for name, value in options.items() if value is not None})
    [(job, _)] = jobs.enqueue([submission.validate_submission(body, rules())])
    click.echo(job.id)


@jobs_group.command("show")
@click.argument("job_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def jobs_show(job_id, as_json):
    """Show a job with its attempts."""
    job = history.get_job(job_id)
    document = documents.job(job, history.attempts_of(job.id))
    if as_json:
        return emit(document)
    attempts = document.pop("attempts")
    echo_fields(document, 15)
    for attempt in attempts:
        click.echo(f"\nattempt {attempt['number']}: {attempt['status']} on {attempt['host']} "
                   f"pid {attempt['pid']} ({attempt['worker_id']}), {attempt['started_at']} → "
                   f"{attempt['finished_at'] or '…'}"
                   + (f", {attempt['duration_ms']:.0f} ms" if attempt["duration_ms"] is not None else "")
                   + (" [fenced: late outcome refused]" if attempt["fenced"] else ""))
        if attempt["error_type"]:
            click.echo(f"  {attempt['error_type']}: {attempt['error_message'] or ''}")
        if attempt["traceback"]:
            click.echo("  " + attempt["traceback"].rstrip().replace("\n", "\n  "))


def _list(as_json, **filters):
    page, cursor = history.list_jobs(**filters)
    if as_json:
        return emit(documents.page([documents.job(job) for job in page], cursor))
    click.echo(f"{'id':>8}  {'type':<24} {'queue':<12} {'status':<10} {'try':>3}  last error")
    for job in page:
        error = (job.last_error or "").splitlines()[0][:60] if job.last_error else ""
        click.echo(f"{job.id:>8}  {job.type:<24} {job.queue:<12} {job.status:<10} "
                   f"{job.attempt:>3}  {error}")
    if cursor:
        click.echo(f"more: --cursor {cursor}")


@jobs_group.command("list")
@click.option("--status", type=click.Choice(statuses.STATUSES))
@click.option("--type")
@click.option("--queue")
@click.option("--limit", type=click.IntRange(1, history.MAX_LIMIT), default=50)
@click.option("--cursor")
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def jobs_list(as_json, **filters):
    """List jobs, newest first."""
    _list(as_json, **filters)


def selection_options(command):
    """`--all` and the filters of a command that acts on one job or on every matching job
    (core.selection), with --json; the command gets them as `every` and `filters`."""
    options = [
        click.option("--all", "every", is_flag=True,
                     help="Every matching job (filtered by the options below), not one."),
        click.option("--type", help="With --all: only jobs of this type."),
        click.option("--queue", help="With --all: only jobs in this queue."),
        click.option("--group", help="With --all: only jobs of this group."),
        click.option("--created-before",
                     help="With --all: only jobs created before this RFC 3339 time."),
        click.option("--json", "as_json", is_flag=True, help="One JSON document."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def chosen(job_id, every, filters):
    """The core.selection.Selection of `--all` and its filters, or None for the one job
    named; a usage error unless exactly one of the two is given."""
    given = {name: value for name, value in filters.items() if value is not None}
    if (job_id is None) == (not every):
        raise click.UsageError("give a job id, or --all (with filters) for every matching job")
    if given and not every:
        raise click.UsageError(f"--{next(iter(given)).replace('_', '-')} filters --all")
    return selection.read(given) if every else None


@jobs_group.command("cancel")
@click.argument("job_id", type=int, required=False)
@selection_options
def jobs_cancel(job_id, every, as_json, **filters):
    """Cancel a job, or with --all every matching job not yet ended (running ones are
    stopped by their supervisors). --all alone cancels every such job."""
    matching = chosen(job_id, every, filters)
    if matching is not None:
        count = jobs.cancel_all(matching)
        return emit({"count": count}) if as_json else click.echo(
            f"{count} jobs cancelled (running ones are stopped by their supervisors)")
    job, stopped = jobs.cancel(job_id)
    if as_json:
        return emit(documents.job(job))
    click.echo(f"job {job.id} cancelled" if stopped else
               f"job {job.id} is running; its worker will be stopped")


WAIT_EXIT_CODES = {statuses.SUCCEEDED: 0, statuses.DEAD: 3, statuses.CANCELLED: 4}
WAIT_TIMED_OUT = 5
WAIT_REMINDER_S = 30  # on a long wait with no change, say it is still waiting this often
STATUS_COLOURS = {statuses.SUCCEEDED: "green", statuses.DEAD: "red", statuses.CANCELLED: "yellow",
                  statuses.RETRYABLE: "yellow", statuses.RUNNING: "cyan"}


def describe_progress(job):
    """One line for where a job is now: its status, its attempt, its progress (what its
    handler last passed ctx.progress), its last error."""
    status = click.style(job.status, fg=STATUS_COLOURS.get(job.status), bold=True)
    if job.attempt == 0:
        return status
    line = f"{status}, attempt {job.attempt}"
    if job.progress is not None:
        line += f", progress {json.dumps(job.progress)[:120]}"
    if job.status in (*statuses.PENDING, statuses.DEAD) and job.last_error:
        line += f": {job.last_error.splitlines()[0][:120]}"
    return line


@jobs_group.command("wait")
@click.argument("job_id", type=int)
@click.option("--timeout", "limit", type=Duration(),
              help="Give up after this long: seconds, or 30s, 15m, 12h "
                   "(default: as long as it takes).")
@click.option("--json", "as_json", is_flag=True, help="Print the final job as one JSON document.")
def jobs_wait(job_id, limit, as_json):
    """Wait for a job to be succeeded, dead or cancelled, showing its status, attempt and
    progress on stderr as they change.

    Exit status: 0 succeeded, 3 dead, 4 cancelled, 5 unfinished at --timeout, 1 when there
    is no such job.
    """
    job = history.get_job(job_id)
    started, interval = time.monotonic(), 0.05  # polls slow down to one a second
    shown, shown_at, outage = None, 0.0, False
    while True:
        elapsed = time.monotonic() - started
        state = (job.status, job.attempt, job.progress)
        if state != shown or elapsed - shown_at >= WAIT_REMINDER_S:
            still = "still " if state == shown else ""
            click.echo(f"{elapsed:7.1f}s  job {job.id} {still}{describe_progress(job)}", err=True)
            shown, shown_at = state, elapsed
        if job.status in statuses.FINAL or (limit is not None and elapsed >= limit):
            break
        time.sleep(interval if limit is None else max(0.0, min(interval, limit - elapsed)))
        interval = min(interval * 1.5, 1.0)
        try:
            job, outage = history.get_job(job_id), False
        except models.DB_ERRORS as exc:  # a database restart: keep waiting through it
            models.reset_connection()
            if not outage:
                click.echo(f"database unavailable, still waiting: {str(exc).strip()[:200]}",
                           err=True)
            outage = True
    if as_json:
        emit(documents.job(job, history.attempts_of(job.id)))
    if job.status not in statuses.FINAL:
        click.echo(f"Error: job {job.id} is still {job.status} after {limit:g}s", err=True)
        raise SystemExit(WAIT_TIMED_OUT)
    if not as_json:
        click.echo(f"job {job.id} {describe_progress(job)}")
    raise SystemExit(WAIT_EXIT_CODES[job.status])


@dlq_group.command("list")
@click.option("--limit", type=click.IntRange(1, history.MAX_LIMIT), default=50)
@click.option("--cursor")
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def dlq_list(limit, cursor, as_json):
    """Dead-lettered jobs, with their last error."""
    _list(as_json, status=statuses.DEAD, limit=limit, cursor=cursor)


@dlq_group.command("retry")
@click.argument("job_id", type=int, required=False)
@selection_options
def dlq_retry(job_id, every, as_json, **filters):
    """Run a dead job again, with a fresh attempt budget; with --all, every matching dead
    job (--all alone: every dead job)."""
    matching = chosen(job_id, every, filters)
    if matching is not None:
        count = jobs.dlq_retry_all(matching)
        return emit({"count": count}) if as_json else click.echo(
            f"{count} dead jobs are available again")
    job = jobs.dlq_retry(job_id)
    if as_json:
        return emit(documents.job(job))
    click.echo(f"job {job_id} is available again")


@dlq_group.command("discard")
@click.argument("job_id", type=int)
def dlq_discard(job_id):
    """Discard a dead job (it becomes cancelled; its history is kept)."""
    jobs.dlq_discard(job_id)
    click.echo(f"job {job_id} discarded")


@schedules_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def schedules_list(as_json):
    """All schedules with their next run."""
    page, cursor, rows = None, None, []
    while True:
        page, cursor = schedules.list_schedules(limit=history.MAX_LIMIT, cursor=cursor)
        rows.extend(page)
        if cursor is None:
            break
    if as_json:
        return emit(documents.page([documents.schedule(s) for s in rows], None))
    click.echo(f"{'name':<24} {'cron':<16} {'timezone':<16} {'type':<20} {'overlap':<7} next run")
    for row in rows:
        doc = documents.schedule(row)
        click.echo(f"{row.name:<24} {row.cron:<16} {row.timezone:<16} {row.type:<20} "
                   f"{row.overlap:<7} {doc['next_run_at'] or 'paused'}")


@schedules_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def schedules_show(name, as_json):
    """A schedule, its next run times and its recent runs."""
    row = schedules.get(name)
    document = documents.schedule(row, schedules.upcoming(row), schedules.recent_runs(name))
    if as_json:
        return emit(document)
    runs = document.pop("recent_runs")
    echo_fields(document, 12)
    for run in runs:
        job = f"job {run['job_id']} ({run['job_status'] or 'pruned'})" if run["job_id"] else ""
        click.echo(f"  {run['slot']}  {run['outcome']:<8} {job} {run['reason'] or ''}".rstrip())


@schedules_group.command("add")
@click.argument("name")
@click.option("--cron", required=True, help=f"Cron expression, {schedules.CRON_FORMAT}")
@click.option("--type", "type_", required=True, help="The job type each run enqueues.")
@click.option("--payload", default="{}", help="The payload of each job, a JSON object.")
@click.option("--timezone", default="UTC", help="IANA timezone the cron is read in.")
@click.option("--overlap", type=click.Choice(["skip", "allow"]), default="skip")
@click.option("--queue")
@click.option("--priority", type=int)
@click.option("--paused", is_flag=True, help="Create it paused.")
def schedules_add(name, cron, type_, payload, **options):
    """Add a recurring schedule; it first fires at its next slot."""
    body = {"name": name, "cron": cron, "type": type_, "payload": json_object(payload)}
    body.update({key: value for key, value in options.items() if value not in (None, False)})
    row = schedules.create(body, rules())
    click.echo(f"schedule {row.name} added; next run {documents.timestamp(row.next_run_at)}")


@schedules_group.command("remove")
@click.argument("name")
def schedules_remove(name):
    """Delete a schedule (jobs it already enqueued stay)."""
    schedules.remove(name)
    click.echo(f"schedule {name} removed")


@schedules_group.command("pause")
@click.argument("name")
def schedules_pause(name):
    """Stop firing a schedule until it is resumed."""
    schedules.set_paused(name, True, rules())
    click.echo(f"schedule {name} paused")


@schedules_group.command("resume")
@click.argument("name")
def schedules_resume(name):
    """Fire a paused schedule again, from its next slot (missed slots are not replayed)."""
    row = schedules.set_paused(name, False, rules())
    click.echo(f"schedule {name} resumed; next run {documents.timestamp(row.next_run_at)}")


@queues_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def queues_list(as_json):
    """Every known queue: its settings and its jobs by status."""
    every = [documents.queue(queue) for queue in queues.list_queues()]
    if as_json:
        return emit(documents.page(every, None))
    click.echo(f"{'queue':<16} {'paused':<6} {'concurrency':>11}  {'rate':<14}"
               + "".join(f"{s:>10}" for s in statuses.STATUSES))
    for queue in every:
        click.echo(f"{queue['name']:<16} {'yes' if queue['paused'] else 'no':<6} "
                   f"{queue['concurrency'] or '-':>11}  {queue['rate'] or '-':<14}"
                   + "".join(f"{queue['counts'].get(s, 0):>10}" for s in statuses.STATUSES))
    if not every:
        click.echo("no queues: none has jobs or settings")


@queues_group.command("pause")
@click.argument("name")
def queues_pause(name):
    """Start no attempt of the queue's jobs until it is resumed (running ones finish)."""
    queues.pause(name)
    click.echo(f"queue {name} paused")


@queues_group.command("resume")
@click.argument("name")
def queues_resume(name):
    """Let a paused queue's jobs start again."""
    queues.resume(name)
    click.echo(f"queue {name} resumed")


@queues_group.command("set")
@click.argument("name")
@click.option("--concurrency",
              help="At most N attempts of the queue running at once; none clears it.")
@click.option("--rate",
              help="At most N attempts started per second, minute or hour (10/second, "
                   "600/minute); none clears it.")
def queues_set(name, concurrency, rate):
    """Limit a queue (the options given; the others keep their value)."""
    queue = queues.update_queue(name, queue_changes(concurrency, rate))
    click.echo(f"queue {name}{' (paused)' if queue.paused else ''}: concurrency "
               f"{queue.concurrency or 'none'}, rate {queue.rate or 'none'}")


def queue_changes(concurrency, rate):
    """The settings `flask queues set` was given, as the core takes them: `none` clears
    one, and a concurrency that reads as an integer is one; anything else goes as typed,
    for the core to refuse naming the setting."""
    changes = {} if rate is None else {"rate": rate}
    if concurrency is not None:
        changes["concurrency"] = (int(concurrency) if re.fullmatch(r"-?[0-9]+", concurrency)
                                  else concurrency)
    return {setting: None if value == "none" else value for setting, value in changes.items()}


keys_group = Commands("keys", help="Create, list and revoke API keys.")


@keys_group.command("create")
@click.argument("name")
@click.option("--admin", is_flag=True, help="An admin key (default: a submit key).")
@click.option("--rate-limit", help="This key's limit, e.g. 10/second (default: RATE_LIMIT).")
def keys_create(name, admin, rate_limit):
    """Create a key; prints it alone on stdout, the only time it is shown."""
    role = "admin" if admin else "submit"
    _, secret = keys.create(name, role, rate_limit)
    click.echo(secret)
    click.echo(f"created {role} key {name!r}; it is shown only this once", err=True)


@keys_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def keys_list(as_json):
    """Every key, active and revoked (never the keys themselves)."""
    every = [documents.api_key(key) for key in keys.all_keys()]
    if as_json:
        click.echo(json.dumps({"items": every}, indent=2))
        return
    click.echo(f"{'name':<24} {'role':<7} {'rate limit':<20} {'created':<25} revoked")
    for key in every:
        click.echo(f"{key['name']:<24} {key['role']:<7} {key['rate_limit'] or 'default':<20} "
                   f"{key['created_at']:<25} {key['revoked_at'] or ''}")


@keys_group.command("revoke")
@click.argument("name")
def keys_revoke(name):
    """Revoke the active key NAME; requests with it get 401 from now on."""
    keys.revoke(name)
    click.echo(f"key {name} revoked")


@click.command("prune", cls=Command)
@click.option("--older-than", type=Duration(),
              help="Age: seconds, or 30s, 15m, 12h, 7d (default: RETENTION_DAYS).")
def prune(older_than):
    """Delete succeeded and cancelled jobs finished before the cutoff."""
    seconds = settings().retention_days * 86400 if older_than is None else older_than
    click.echo(f"pruned {history.prune(seconds)} jobs")


@click.command("audit", cls=Command)
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def audit_command(as_json):
    """Check every job's stored history against the guarantees (README, Guarantees): one
    attempt at a time, each attempt at most once, fencing, nothing lost, succeeded is final.
    Exits 1 on any violation."""
    report = audit.run()
    if as_json:
        emit({"jobs": report.jobs, "attempts": report.attempts,
              "violations": [{"job_id": v.job_id, "guarantee": v.guarantee, "detail": v.detail}
                             for v in report.violations]})
    else:
        for violation in report.violations:
            click.echo(str(violation))
        click.echo(f"audit: {report.jobs} jobs, {report.attempts} attempts, "
                   f"{len(report.violations)} violations")
    raise SystemExit(1 if report.violations else 0)


@click.command("handlers", cls=Command)
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def handlers_command(as_json):
    """The registered job types (this folder's handlers/ and HANDLER_PATHS) with what a job
    of each gets unless it says otherwise: queue, attempts, timeout, backoff."""
    rows = [handler_options(h) for _, h in sorted(handlers.registered().items())]
    if as_json:
        return emit({"items": rows})
    click.echo(f"{'type':<24} {'queue':<12} {'attempts':>8} {'timeout':>8} {'backoff':<12} "
               f"{'schema':<6} path")
    for row in rows:
        backoff = f"{row['backoff_base_s']:g}s..{row['backoff_max_s']:g}s"
        click.echo(f"{row['type']:<24} {row['queue']:<12} {row['max_attempts']:>8} "
                   f"{row['timeout_s']:>7g}s {backoff:<12} {'yes' if row['schema'] else 'no':<6} "
                   f"{row['path']}")
    if not rows:
        click.echo("no job types: add a module to handlers/ or a folder to HANDLER_PATHS")


def handler_options(handler):
    """A job type's options as a job gets them: the handler's own, else the settings'."""
    return {"type": handler.name, **submission.job_defaults(handler, rules())._asdict(),
            "schema": handler.schema is not None,
            "module": handler.origin,
            "path": inspect.getsourcefile(handler.fn)}


@click.command("top", cls=Command)
@click.option("--interval", type=Duration(minimum=0.1), default="2s", show_default=True,
              help="Time between refreshes: seconds, or 2s, 1m.")
@click.option("--once", is_flag=True, help="Print one frame and exit.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (stats and workers).")
def top(interval, once, as_json):
    """A live view of the queues (jobs by status) and the workers (what each is running);
    Ctrl-C to leave."""
    lease_s = settings().lease_s
    if as_json:
        return emit({"stats": history.stats(lease_s),
                     "workers": [documents.worker(w) for w in registry.live_workers(lease_s)]})
    if once:
        return click.echo(top_frame(lease_s))
    # Ctrl-C is the way out, even when started with SIGINT ignored (a shell's background job,
    # some CI runners): an ignored signal stays ignored across exec, and Python keeps it so.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while True:
            frame = top_frame(lease_s)
            click.clear()
            click.echo(frame)
            time.sleep(interval)
    except KeyboardInterrupt:
        pass


def top_frame(lease_s):
    """One screen of `flask top`, read through the core (a database outage is shown, not
    raised, so the view outlives it)."""
    try:
        stats, workers, clock = history.stats(lease_s), registry.live_workers(lease_s), jobs.db_time()
        # What each worker runs (type, attempt, for how long) comes from the running jobs.
        running, _ = history.list_jobs(status=statuses.RUNNING, limit=history.MAX_LIMIT)
    except models.DB_ERRORS as exc:
        models.reset_connection()
        return click.style(f"database unavailable: {str(exc).strip()[:200]}", fg="red")
    lines = [click.style(f"conveyor  {documents.timestamp(clock)}  workers alive: "
                         f"{stats['workers_alive']}  oldest available job: "
                         f"{stats['oldest_available_age_s']:.1f}s", bold=True), ""]
    lines.append(click.style(f"{'queue':<16}" + "".join(f"{s:>10}" for s in statuses.STATUSES),
                             bold=True))
    for queue, counts in sorted(stats["queues"].items()) + [("(all)", stats["totals"])]:
        lines.append(f"{queue[:16]:<16}"
                     + "".join(f"{counts.get(s, 0):>10}" for s in statuses.STATUSES))
    lines += ["", click.style(f"{'host':<20} {'pid':>7}  {'queues':<16} {'heartbeat':>9}  job",
                              bold=True)]
    running_on = {job.lease_owner: job for job in running}
    for worker in workers:
        job = running_on.get(worker.id)
        doing = "idle" if job is None else (
            f"{job.id} {job.type} attempt {job.attempt}"
            + (f", {clock - job.started_at:.1f}s" if job.started_at else ""))
        lines.append(f"{worker.host[:20]:<20} {worker.pid:>7}  "
                     f"{','.join(worker.queues or []) or 'all':<16} "
                     f"{clock - worker.last_heartbeat_at:>8.1f}s  {doing}")
    if not workers:
        lines.append("no live workers")
    return "\n".join(lines)


def register(app):
    for command in (db_group, jobs_group, dlq_group, schedules_group, queues_group, keys_group,
                    prune, audit_command, handlers_command, top):
        app.cli.add_command(command)
