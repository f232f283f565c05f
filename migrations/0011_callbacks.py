"""Signed callbacks (SPEC §12): each API key's callback secret, and one callback a job.

A callback is `pending` from its job's submission; it is due once its job ends. The job's
end is marked by a trigger on `jobs`, in the database, so that every way a job ends (a
worker's report, the reaper, a cancel, a DLQ discard, and any added later) makes its
callback due without each of them having to remember it: the trigger sets `due_at` and
`ended_at` and starts the count of attempts afresh (a job retried from the dead-letter
queue that ends again is told again). It only writes `callbacks`, never a job; it is
called only for jobs marked `has_callback` (set with their callback), so the others end
at no cost.
The supervisor's delivery duty (core/callbacks.py) takes due callbacks under a lease.
"""
import secrets

import peewee as pw

ENDED = "('succeeded', 'dead', 'cancelled')"

POSTGRES_TRIGGER = f"""
CREATE OR REPLACE FUNCTION conveyor_callback_due() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE callbacks
    SET status = 'pending', attempts = 0, last_error = NULL, lease = NULL,
        ended_at = COALESCE(NEW.finished_at, extract(epoch from clock_timestamp())::float8),
        due_at = COALESCE(NEW.finished_at, extract(epoch from clock_timestamp())::float8)
    WHERE job_id = NEW.id;
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_callback_due AFTER UPDATE OF status ON jobs FOR EACH ROW
WHEN (NEW.has_callback AND NEW.status IN {ENDED} AND OLD.status IS DISTINCT FROM NEW.status)
EXECUTE FUNCTION conveyor_callback_due();
"""

SQLITE_TRIGGER = f"""
CREATE TRIGGER jobs_callback_due AFTER UPDATE OF status ON jobs FOR EACH ROW
WHEN NEW.has_callback AND NEW.status IN {ENDED} AND OLD.status IS NOT NEW.status
BEGIN
    UPDATE callbacks
    SET status = 'pending', attempts = 0, last_error = NULL, lease = NULL,
        ended_at = COALESCE(NEW.finished_at, (julianday('now') - 2440587.5) * 86400.0),
        due_at = COALESCE(NEW.finished_at, (julianday('now') - 2440587.5) * 86400.0)
    WHERE job_id = NEW.id;
END
"""


def up(migrator, db):
    postgres = isinstance(db, pw.PostgresqlDatabase)
    db.execute_sql("ALTER TABLE api_keys ADD COLUMN callback_secret TEXT")
    # Whether a job has a callback: the trigger's own condition, so that the jobs without
    # one (nearly all) end without calling it.
    db.execute_sql("ALTER TABLE jobs ADD COLUMN has_callback BOOLEAN NOT NULL DEFAULT FALSE")
    # Every key has a secret, those made before this migration too.
    for (key_id,) in db.execute_sql("SELECT id FROM api_keys").fetchall():
        db.execute_sql(f"UPDATE api_keys SET callback_secret = {db.param} WHERE id = {db.param}",
                       (secrets.token_hex(32), key_id))
    db.execute_sql("""CREATE TABLE callbacks (
        job_id BIGINT PRIMARY KEY,
        url TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending'
            CHECK (status IN ('pending', 'delivered', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        due_at DOUBLE PRECISION,
        ended_at DOUBLE PRECISION,
        lease TEXT,
        delivered_at DOUBLE PRECISION
    )""")
    # What the delivery duty takes: due callbacks, the earliest first.
    db.execute_sql("""CREATE INDEX callbacks_due ON callbacks (due_at)
                      WHERE status = 'pending' AND due_at IS NOT NULL""")
    db.execute_sql(POSTGRES_TRIGGER if postgres else SQLITE_TRIGGER)
