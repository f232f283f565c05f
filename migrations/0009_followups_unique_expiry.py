"""Jobs that talk back (SPEC §12): follow-up jobs, unique jobs, expiry.

- `jobs.parent_id`: the job whose successful attempt made this one (`ctx.enqueue`).
- `jobs.unique_key`, `jobs.unique_while` (`queued` or `active`): as submitted.
  `jobs.unique_hold`: the key while it holds (the unique index `jobs_unique`, per type,
  decides between concurrent submissions). A job holds its key from its insert until it
  starts (`queued`) or ends (`active`), and never again: a retried or re-queued job does not
  take it back, so no transition can ever collide with a newer job's key. A trigger lets
  it go, on every path a job moves by (a claim, a report, the reaper, a cancel).
- `jobs.expires_at`: a job not started by then never starts; it ends `cancelled` with
  `jobs.cancel_reason` `expired`.
"""
import peewee as pw

WAITING = "status IN ('available', 'scheduled', 'retryable')"

# Whether a job that holds its unique key lets it go as it moves to this status.
RELEASES = ("NEW.status IN ('succeeded', 'dead', 'cancelled') "
            "OR (NEW.status = 'running' AND NEW.unique_while = 'queued')")

POSTGRES_TRIGGER = f"""
CREATE OR REPLACE FUNCTION conveyor_release_unique() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.unique_hold := NULL;
    RETURN NEW;
END $$;
CREATE TRIGGER jobs_release_unique BEFORE UPDATE OF status ON jobs
FOR EACH ROW WHEN (NEW.unique_hold IS NOT NULL AND ({RELEASES}))
EXECUTE FUNCTION conveyor_release_unique();
"""

SQLITE_TRIGGER = f"""
CREATE TRIGGER jobs_release_unique AFTER UPDATE OF status ON jobs
FOR EACH ROW WHEN NEW.unique_hold IS NOT NULL AND ({RELEASES})
BEGIN
    UPDATE jobs SET unique_hold = NULL WHERE id = NEW.id;
END
"""


def up(migrator, db):
    postgres = isinstance(db, pw.PostgresqlDatabase)
    for column in ("parent_id BIGINT", "unique_key TEXT",
                   "unique_while TEXT CHECK (unique_while IN ('queued', 'active'))",
                   "unique_hold TEXT", "expires_at DOUBLE PRECISION", "cancel_reason TEXT"):
        db.execute_sql(f"ALTER TABLE jobs ADD COLUMN {column}")
    for statement in (
        "CREATE INDEX jobs_parent ON jobs (parent_id, id) WHERE parent_id IS NOT NULL",
        "CREATE UNIQUE INDEX jobs_unique ON jobs (type, unique_hold) WHERE unique_hold IS NOT NULL",
        f"CREATE INDEX jobs_expiring ON jobs (expires_at) WHERE expires_at IS NOT NULL AND {WAITING}",
        POSTGRES_TRIGGER if postgres else SQLITE_TRIGGER,
    ):
        db.execute_sql(statement)
