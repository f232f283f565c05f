"""The core's named SQL (core/store/*.sql) against the rules it promises: every status word
it spells is one core/status.py names, a claim spells the partial index's predicate word for
word, and every statement that moves a running job carries the ownership guard. No database
needed: these read the statements."""
import importlib.util
import os
import re

import pytest

from conftest import ROOT
from core import status as S
from core.store import postgres, sqlite


def migration(name):
    path = os.path.join(ROOT, "migrations", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# On PostgreSQL the claim and the transition of a running job are functions that
# migrations define (the latest definition of each).
STEP_FUNCTIONS = migration("0014_generic_claim_plans")
RECORD = migration("0019_steps_read_by_id").RECORD
STORES = {"postgres": {**postgres.SQL, "conveyor_step": STEP_FUNCTIONS.STEP,
                       "conveyor_next": STEP_FUNCTIONS.NEXT,
                       "conveyor_claim": STEP_FUNCTIONS.CLAIM,
                       "conveyor_record": RECORD},
          "sqlite": sqlite.SQL}
STATEMENTS = [(db, name, sql) for db, statements in STORES.items()
              for name, sql in statements.items()]
# The predicate of the partial indexes a claim reads (migrations/0001_jobs.py).
WAITING = "status IN ('available', 'scheduled', 'retryable')"


@pytest.mark.parametrize("db, name, sql", STATEMENTS, ids=[f"{d}-{n}" for d, n, _ in STATEMENTS])
def test_every_status_word_in_the_sql_is_one_the_core_names(db, name, sql):
    compared = re.findall(r"status\s*(?:=|<>|IN)\s*\(?([^)\n]*)", sql)
    words = {word for text in compared for word in re.findall(r"'(\w+)'", text)}
    assigned = set(re.findall(r"THEN '(\w+)'|ELSE '(\w+)'|status = '(\w+)'", sql))
    words |= {word for group in assigned for word in group if word}
    assert words <= set(S.STATUSES) | set(S.ATTEMPT_STATUSES) | set(S.CALLBACK_STATUSES), (db, name)


def test_the_waiting_predicate_is_the_pending_statuses():
    assert WAITING == "status IN (%s)" % ", ".join(f"'{status}'" for status in S.PENDING)


@pytest.mark.parametrize("db, name", [
    ("postgres", "conveyor_next"), ("sqlite", "due"), ("sqlite", "due_in_queue"),
    ("sqlite", "claim_ids"), ("sqlite", "any_due"), ("sqlite", "any_due_in_queue"),
    ("sqlite", "limited_candidates")])
def test_a_claim_spells_the_partial_index_predicate_word_for_word(db, name):
    assert WAITING in STORES[db][name]


def moves_of_a_running_job(sql):
    """The UPDATEs of jobs in sql that end a lease (they set lease_owner to NULL)."""
    return [part for part in re.split(r"\bUPDATE\b", sql)[1:]
            if part.lstrip().startswith("jobs") and "lease_owner = NULL" in part]


@pytest.mark.parametrize("db, name", [("postgres", "conveyor_record"), ("sqlite", "move")])
def test_the_one_transition_of_a_running_job_carries_the_ownership_guard(db, name):
    """It moves a job only while it runs the attempt under the lease reported. PostgreSQL
    names the attempt and the lease only: a job has a lease exactly while it runs (the
    check test_the_database_ties_a_lease_to_running asserts), and naming the status too let
    its plan read every running job through jobs_running (migrations/0019_steps_read_by_id.py)."""
    [move] = moves_of_a_running_job(STORES[db][name])
    guard = re.sub(r"\s+", " ", move)
    status = "" if db == "postgres" else "status = 'running' AND "
    assert re.search(status + r"(jobs\.)?attempt = (r\.|:)attempt "
                     r"AND (jobs\.)?lease_owner = (r\.|:)lease_owner", guard), move


def test_no_other_statement_moves_a_running_job():
    """One transition function: only conveyor_record (PostgreSQL, which the step calls) and
    move (SQLite) end a lease."""
    moving = {(db, name) for db, name, sql in STATEMENTS if moves_of_a_running_job(sql)}
    assert moving == {("postgres", "conveyor_record"), ("sqlite", "move")}
    assert "conveyor_step(" in postgres.SQL["step"]
    assert "conveyor_record(" in STEP_FUNCTIONS.STEP and "conveyor_claim(" in STEP_FUNCTIONS.STEP


def test_both_databases_name_their_statements_once_each():
    for statements in STORES.values():
        assert all(sql.strip() and not sql.rstrip().endswith(";") for sql in statements.values())
    assert {"step", "insert_jobs", "stale_claim"} <= set(postgres.SQL)
    assert {"move", "end_attempt", "fence", "due", "insert_jobs", "stale_claim"} <= set(sqlite.SQL)


def test_the_database_ties_a_lease_to_running(conveyor):
    """A job has a lease owner exactly while it runs: the database refuses anything else,
    so a move guarded by the lease is guarded by the status too."""
    import peewee as pw
    from core import jobs, submission
    from conftest import rules
    from models import Job, db
    [(job, _)] = jobs.enqueue([submission.validate_submission({"type": "t.noop"}, rules())])
    for fields in ({"lease_owner": "w-1"}, {"status": "running"}):
        with pytest.raises(pw.IntegrityError):
            with db.atomic():
                Job.update(**fields).where(Job.id == job.id).execute()
    assert Job.get_by_id(job.id).status == "available"
