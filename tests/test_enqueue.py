"""Enqueue, the core of submission: one statement that stores a batch and, on PostgreSQL,
once that is committed, announces the jobs that can run now (one NOTIFY per queue, with its
count); what it answers is what it stored; its fast checks agree with the schema."""
import os
import select
import threading

import psycopg2
import pytest
from jsonschema import Draft202012Validator

from core import documents
from core import jobs
from core import history
from core import submission
from core import workers
from core.store import postgres
import handlers
import models
from conftest import in_threads, wait_for, rules
from core.errors import Conflict, Invalid, TooLarge
from models import Job


def new_job(**fields):
    return submission.validate_submission({"type": "t.noop", **fields}, rules())


@pytest.fixture
def listener(pg_conveyor):
    """A real LISTEN connection on the conveyor's database; returns a function that gives
    the payloads of the notifications received so far."""
    connection = psycopg2.connect(pg_conveyor.database_url)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f"LISTEN {jobs.NOTIFY_CHANNEL}")

    def received(quiet_s=0.3):
        payloads = []
        while select.select([connection], [], [], quiet_s)[0]:
            connection.poll()
            payloads += [n.payload for n in connection.notifies if n.channel == jobs.NOTIFY_CHANNEL]
            connection.notifies.clear()
        return payloads

    yield received
    connection.close()


@pytest.mark.postgres
def test_a_batch_announces_each_queue_once_with_the_count_it_can_run_now(listener):
    jobs.enqueue([new_job(queue="a")] * 3 + [new_job(queue="b")] * 2
                 + [new_job(queue="a", delay_s=3600)] * 2
                 + [new_job(queue="b", run_at="2001-01-01T00:00:00Z")])
    assert sorted(listener()) == [jobs.notify_payload("a", 3), jobs.notify_payload("b", 3)]


@pytest.mark.postgres
def test_scheduled_jobs_and_idempotent_replays_are_not_announced(listener):
    jobs.enqueue([new_job(delay_s=60), new_job(run_at="2100-01-01T00:00:00Z")])
    assert listener() == []
    [(first, created)] = jobs.enqueue([new_job(idempotency_key="k1")], api_key_id=7)
    assert created and listener() == [jobs.notify_payload("default", 1)]
    [(again, created)] = jobs.enqueue([new_job(idempotency_key="k1")], api_key_id=7)
    assert not created and again.id == first.id and listener() == []


@pytest.mark.postgres
def test_a_refused_batch_announces_nothing_and_stores_nothing(listener):
    jobs.enqueue([new_job(idempotency_key="taken", payload={"v": 1})])
    assert listener() == [jobs.notify_payload("default", 1)]
    with pytest.raises(Conflict):
        jobs.enqueue([new_job(queue="q")] * 5
                     + [new_job(idempotency_key="taken", payload={"v": 2})])
    assert listener() == [] and Job.select().count() == 1


@pytest.mark.postgres
def test_a_job_retried_from_the_dead_letter_queue_is_announced(listener):
    [(job, _)] = jobs.enqueue([new_job(queue="late")])
    Job.update(status="dead", dead_reason="max_attempts").where(Job.id == job.id).execute()
    assert listener() == [jobs.notify_payload("late", 1)]
    jobs.dlq_retry(job.id)
    assert listener() == [jobs.notify_payload("late", 1)]
    with pytest.raises(Conflict):
        jobs.dlq_retry(job.id)
    assert listener() == []


def _statements_sent(operation):
    """The prepared statements this thread sent while operation ran, by name."""
    names = {models.statement_name(sql): name for name, sql in postgres.SQL.items()}
    me, sent = threading.get_ident(), []
    hook = (lambda event: sent.append(event.sql) if threading.get_ident() == me else None)
    models.db.obj.query_hooks.append(hook)
    try:
        operation()
    finally:
        models.db.obj.query_hooks.remove(hook)
    return [names.get(sql.split("(")[0].split()[1]) for sql in sent if sql.startswith("EXECUTE")]


@pytest.mark.postgres
def test_a_submission_alone_is_announced_by_the_statement_that_stores_it(listener):
    """One round trip from the call to the waiting worker's wake-up: the NOTIFY goes out
    at the jobs' own commit, which waits for its flush as ever."""
    assert models.prepares_statements()
    assert _statements_sent(lambda: jobs.enqueue([new_job()])) == ["insert_jobs"]
    assert listener() == [jobs.notify_payload("default", 1)]
    assert models.db.execute_sql("SHOW synchronous_commit").fetchone() == ("on",)


@pytest.fixture
def another_submission_under_way(pg_conveyor):
    """Another submission of this process under way while the test runs: a thread's
    enqueue of a key that a second thread stored in a transaction it keeps open, so that
    the first waits on the row lock."""
    holding, release = threading.Event(), threading.Event()

    def holder():
        with models.db.atomic():
            jobs.enqueue([new_job(idempotency_key="k")])
            holding.set()
            release.wait(15)
        models.db.close()

    def waiter():
        jobs.enqueue([new_job(idempotency_key="k")])
        models.db.close()

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    try:
        assert holding.wait(10)
        threads.append(threading.Thread(target=waiter))
        threads[1].start()
        wait_for(lambda: models.db.execute_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'").fetchone()[0], message="the submission to wait")
        yield
    finally:
        release.set()
        for thread in threads:
            thread.join(15)


@pytest.mark.postgres
def test_while_another_submission_is_under_way_jobs_are_announced_after_their_commit(
        listener, another_submission_under_way):
    """PostgreSQL holds one lock for every notifying commit through that commit's WAL
    flush: concurrent submissions that notified in their commits would commit one flush
    after another. While another submission of this process is under way, the jobs'
    statement notifies nothing and the submission sends nothing more: the process's
    announcer announces them after their commit, from its own connection, in a
    transaction that commits without waiting for its flush. The session stays
    synchronous, so the next jobs' commit waits for theirs."""
    assert _statements_sent(lambda: jobs.enqueue([new_job(queue="meanwhile")])) == [
        "insert_jobs"]
    assert listener() == [jobs.notify_payload("meanwhile", 1)]
    assert models.db.execute_sql("SHOW synchronous_commit").fetchone() == ("on",)


@pytest.mark.postgres
def test_announcements_left_to_the_announcer_add_up_to_every_job_that_can_run(
        listener, another_submission_under_way):
    """Submissions from many threads at once: whether their announcements go out one by
    one or together, each queue is announced with every job of it that can run now, and
    no more (a scheduled job waits for its time)."""
    def submit(queue):
        for _ in range(5):
            jobs.enqueue([new_job(queue=queue), new_job(queue="shared"),
                          new_job(queue="shared", delay_s=3600)])
        models.db.close()

    in_threads(submit, [(f"q{n}",) for n in range(4)], timeout=30)
    announced = {}
    for payload in listener():
        queue, _, count = payload.rpartition(":")
        announced[queue] = announced.get(queue, 0) + int(count)
    assert announced == {"q0": 5, "q1": 5, "q2": 5, "q3": 5, "shared": 20}


@pytest.mark.postgres
def test_a_forked_process_announces_with_an_announcer_of_its_own(
        listener, another_submission_under_way):
    """The announcer's thread does not survive a fork (gunicorn forks its workers): a
    child that submits while another submission of its own is under way still announces."""
    jobs.enqueue([new_job(queue="parent")])  # the parent's announcer thread runs
    assert listener() == [jobs.notify_payload("parent", 1)]
    heard_r, heard_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its own connection, one submission under way, one more
        code = 1
        try:
            models.reset_connection()
            with jobs._submissions.one():
                jobs.enqueue([new_job(queue="child")])
            select.select([heard_r], [], [], 15)  # alive until the parent heard it
            code = 0
        finally:
            os._exit(code)
    try:
        assert listener() == [jobs.notify_payload("child", 1)]
    finally:
        os.write(heard_w, b"!")
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.postgres
def test_jobs_stored_in_a_callers_transaction_are_announced_at_its_durable_commit(listener):
    with models.db.atomic():
        jobs.enqueue([new_job(queue="inside")])
        assert models.db.execute_sql("SHOW synchronous_commit").fetchone() == ("on",)
        assert listener(quiet_s=0.2) == []
    assert listener() == [jobs.notify_payload("inside", 1)]


@pytest.mark.postgres
def test_jobs_whose_announcement_fails_are_stored_and_answered(
        pg_conveyor, listener, another_submission_under_way, monkeypatch, caplog):
    """An announcement after the jobs' commit that fails loses a wake-up (workers poll),
    so the caller is answered with the stored jobs, not an error that would make it store
    them again; the announcer goes on announcing."""
    announce = postgres.SQL["announce"]
    monkeypatch.setitem(postgres.SQL, "announce", "SELECT %(channel)s::text, "
                        "%(queues)s::text[], %(counts)s::int[], 1 / 0")
    [(job, created)] = jobs.enqueue([new_job()])
    assert created and history.get_job(job.id).status == "available"
    wait_for(lambda: "not announced" in caplog.text, message="the failure to be logged")
    [(second, _)] = jobs.enqueue([new_job()])
    assert second.id > job.id
    monkeypatch.setitem(postgres.SQL, "announce", announce)
    listener()
    jobs.enqueue([new_job(queue="after")])
    assert listener() == [jobs.notify_payload("after", 1)]


def test_what_enqueue_answers_is_what_it_stored(conveyor):
    new = [new_job(payload={"n": 1, "s": "Stra\u00dfe \U0001f4a5", "big": 10 ** 30}),
           new_job(queue="q", priority=-5, delay_s=3600, max_attempts=2, timeout_s=1.5,
                      backoff={"base_s": 0.25, "max_s": 8}),
           new_job(run_at="2001-02-03T04:05:06.5+01:00", idempotency_key="once"),
           new_job(run_at="2001-02-03T04:05:06.5+01:00", idempotency_key="once"),
           new_job(payload={"n": 2})]
    stored = jobs.enqueue(new, api_key_id=3)
    assert [created for _, created in stored] == [True, True, True, False, True]
    assert stored[3][0].id == stored[2][0].id
    for job, _ in stored:
        read = history.get_job(job.id)
        assert job._asdict() == read.__data__
        assert documents.job(job) == documents.job(read)
    assert [job.status for job, _ in stored] == ["available", "scheduled", "available",
                                                 "available", "available"]
    ids = [job.id for job, _ in stored]
    assert ids[0] < ids[1] < ids[2] < ids[4]


def test_a_job_due_now_is_available_and_a_later_one_scheduled(conveyor):
    before = jobs.db_time()
    [(job, _)] = jobs.enqueue([new_job()])
    assert job.status == "available" and before <= job.created_at == job.run_at <= jobs.db_time()
    [(later, _)] = jobs.enqueue([new_job(delay_s=0.5)])
    assert later.status == "scheduled" and later.run_at == pytest.approx(later.created_at + 0.5)


BODIES = [
    {"type": "t.noop"},
    {"type": "t.noop", "priority": 1},
    {"type": "t.noop", "priority": True},
    {"type": "t.noop", "priority": 1.0},
    {"type": "t.noop", "priority": 1.5},
    {"type": "t.noop", "priority": "1"},
    {"type": "t.noop", "queue": "default"},
    {"type": "t.noop", "queue": "default\n"},
    {"type": "t.noop", "queue": 5},
    {"type": "t.noop", "payload": {}},
    {"type": "t.noop", "payload": []},
    {"type": "t.noop", "payload": None},
    {"type": "t.noop", "delay_s": 0},
    {"type": "t.noop", "delay_s": -0.0},
    {"type": "t.noop", "delay_s": False},
    {"type": "t.noop", "timeout_s": 0},
    {"type": "t.noop", "backoff": {"base_s": 1}},
    {"type": "t.noop", "backoff": {"base_s": "1"}},
    {"type": "t.noop", "idempotency_key": "k"},
    {"type": "t.noop", "idempotency_key": ""},
    {"type": "t.noop", "colour": "red"},
    {"type": ""},
    {"type": None},
    {"payload": {}},
]


def fits_the_schema(body):
    """validate_submission's verdict on the schema alone (later checks may refuse too)."""
    try:
        submission.validate_submission(body, rules())
    except Invalid as exc:
        return exc.detail != "the job is not valid"
    return True


def test_values_found_valid_before_do_not_let_an_unequal_value_through(conveyor):
    schema = Draft202012Validator(submission.SUBMISSION_SCHEMA)
    expected = [schema.is_valid(body) for body in BODIES]
    assert expected.count(True) > 5 and expected.count(False) > 5
    submission.forget_valid_values()
    assert [fits_the_schema(body) for body in BODIES] == expected
    # Again, now that the valid values are remembered (True == 1 and 1.0 == 1, but only 1
    # and 1.0 are integers; -0.0 == 0 and both are fine).
    assert [fits_the_schema(body) for body in BODIES] == expected
    assert [fits_the_schema(body) for body in reversed(BODIES)] == expected[::-1]


def test_a_job_with_the_options_of_one_resolved_before_still_has_its_payload_checked(
        conveyor):
    checked = rules()._replace(max_payload_bytes=100)
    submission.forget_valid_values()
    first = submission.validate_submission({"type": "t.schema", "payload": {"to": "a"}},
                                           checked)
    again = submission.validate_submission({"type": "t.schema", "payload": {"to": "b"}},
                                           checked)
    assert again == first._replace(payload={"to": "b"}, payload_json='{"to":"b"}')
    for payload, refusal in [({}, Invalid), ({"to": float("nan")}, Invalid),
                             ({"to": "x" * 200}, TooLarge), ([], Invalid), ("to", Invalid)]:
        with pytest.raises(refusal):
            submission.validate_submission({"type": "t.schema", "payload": payload}, checked)
    with pytest.raises(Invalid):
        submission.validate_submission({"type": "t.schema"}, checked)


def test_a_type_registered_again_resolves_with_its_new_options(conveyor, monkeypatch):
    monkeypatch.setattr(handlers, "_registry", dict(handlers._registry))

    def again(payload, ctx):
        pass

    handlers.handler("t.again", queue="first", max_attempts=2)(again)
    assert submission.validate_submission({"type": "t.again"}, rules()).queue == "first"
    handlers.handler("t.again", queue="second", schema={"type": "object",
                                                         "required": ["n"]})(again)
    with pytest.raises(Invalid):
        submission.validate_submission({"type": "t.again"}, rules())
    resolved = submission.validate_submission({"type": "t.again", "payload": {"n": 1}}, rules())
    assert (resolved.queue, resolved.max_attempts) == ("second", rules().default_max_attempts)


@pytest.mark.postgres
def test_prepared_statements_outlive_a_rollback_and_are_made_again_on_a_new_connection(
        pg_conveyor):
    """Submission and claims run as statements prepared once per connection: a rolled-back
    transaction keeps them (PREPARE is not transactional), and a connection lost with the
    server's session is replaced before use and prepares them again instead of naming
    statements it no longer has."""
    [(first, _)] = jobs.enqueue([new_job()])
    with pytest.raises(RuntimeError):
        with models.db.atomic():
            jobs.enqueue([new_job(idempotency_key="undone")])
            raise RuntimeError("roll back")
    assert not Job.select().where(Job.idempotency_key == "undone").exists()
    [(second, _)] = jobs.enqueue([new_job(idempotency_key="after")])  # prepared in it

    killer = psycopg2.connect(pg_conveyor.database_url)
    killer.autocommit = True
    backend = models.db.connection().get_backend_pid()
    with killer.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", (backend,))

        def ended():
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (backend,))
            return cursor.fetchone()[0] == 0
        wait_for(ended, message="the terminated session to end")
    killer.close()
    [(third, _)] = jobs.enqueue([new_job()])  # the session, and its statements, were gone
    assert models.db.connection().get_backend_pid() != backend
    worker = workers.WorkerInfo(id="w-prepared", supervisor_id="s", host="h", pid=1)
    claimed = jobs.claim(worker, limit=10)
    assert [job.id for job in claimed] == [first.id, second.id, third.id]


@pytest.mark.postgres
def test_statements_run_unprepared_once_the_session_forgets_them(pg_conveyor):
    """Behind a transaction-pooling pgbouncer each transaction may go to another server
    session, where the statement this connection prepared is unknown: submission and
    claims go on, unprepared from then on (here the session forgets them itself)."""
    assert models.prepares_statements()
    [(first, _)] = jobs.enqueue([new_job()])
    models.db.execute_sql("DEALLOCATE ALL")
    [(second, _)] = jobs.enqueue([new_job()])
    assert not models.prepares_statements()
    worker = workers.WorkerInfo(id="w-unprepared", supervisor_id="s", host="h", pid=1)
    assert [job.id for job in jobs.claim(worker, limit=5)] == [first.id, second.id]


@pytest.mark.postgres
def test_statements_run_unprepared_when_the_session_has_another_clients(pg_conveyor):
    """...or the other session already holds a statement of that name, prepared there by
    another client of the pool: the claim still takes its job."""
    assert models.prepares_statements()
    [(job, _)] = jobs.enqueue([new_job()])
    worker = workers.WorkerInfo(id="w-unprepared", supervisor_id="s", host="h", pid=1)
    claim_sql, _ = jobs.claim_statement(worker)
    models.db.execute_sql(f"PREPARE {models.statement_name(claim_sql)} AS SELECT 1")
    assert [claimed.id for claimed in jobs.claim(worker)] == [job.id]
    assert not models.prepares_statements()


def test_a_job_due_now_can_be_claimed_at_once(conveyor):
    """A job stored due now is claimed by the very next claim. (SQLite's own 'now' runs up
    to a millisecond behind the clock a job's run_at is stored with: a check on it found
    no job due yet.)"""
    worker = workers.WorkerInfo(id="w-at-once", supervisor_id="s", host="h", pid=1)
    for _ in range(20):
        [(job, _)] = jobs.enqueue([new_job()])
        assert [claimed.id for claimed in jobs.claim(worker)] == [job.id]
