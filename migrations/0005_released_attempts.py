"""Attempts may end `released`: claimed by a worker that died before it began them.

PostgreSQL replaces the status check in place. SQLite cannot alter a check, so the table
is rebuilt with the new one (its rows, ids and unique (job, number) kept).
"""
import peewee as pw

STATUSES = ("'running', 'succeeded', 'failed', 'timed_out', 'crashed', 'interrupted', "
            "'cancelled', 'released'")


def up(migrator, db):
    if isinstance(db, pw.PostgresqlDatabase):
        db.execute_sql(f"""ALTER TABLE attempts DROP CONSTRAINT attempts_status_check,
            ADD CONSTRAINT attempts_status_check CHECK (status IN ({STATUSES}))""")
        return
    for statement in (
        f"""CREATE TABLE attempts_new (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id BIGINT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            number INTEGER NOT NULL CHECK (number >= 1),
            status TEXT NOT NULL CHECK (status IN ({STATUSES})),
            worker_id TEXT NOT NULL,
            host TEXT,
            pid INTEGER,
            started_at DOUBLE PRECISION NOT NULL,
            finished_at DOUBLE PRECISION,
            error_type TEXT,
            error_message TEXT,
            traceback TEXT,
            fenced BOOLEAN NOT NULL DEFAULT FALSE,
            UNIQUE (job_id, number)
        )""",
        "INSERT INTO attempts_new SELECT id, job_id, number, status, worker_id, host, pid, "
        "started_at, finished_at, error_type, error_message, traceback, fenced FROM attempts",
        "DROP TABLE attempts",
        "ALTER TABLE attempts_new RENAME TO attempts",
    ):
        db.execute_sql(statement)
