"""Recurring schedules and the record of every slot they fired.

The unique (schedule, slot) key is what makes a slot fire exactly once however many
supervisors run: the first to insert the slot's row enqueues its job.
"""
import peewee as pw


def up(migrator, db):
    postgres = isinstance(db, pw.PostgresqlDatabase)
    serial = "BIGSERIAL PRIMARY KEY" if postgres else "INTEGER PRIMARY KEY AUTOINCREMENT"
    statements = [
        """CREATE TABLE schedules (
            name TEXT PRIMARY KEY,
            cron TEXT NOT NULL,
            type TEXT NOT NULL,
            payload TEXT NOT NULL,
            queue TEXT,
            priority INTEGER NOT NULL DEFAULT 0,
            timezone TEXT NOT NULL DEFAULT 'UTC',
            overlap TEXT NOT NULL DEFAULT 'skip' CHECK (overlap IN ('skip', 'allow')),
            paused BOOLEAN NOT NULL DEFAULT FALSE,
            next_run_at DOUBLE PRECISION NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX schedules_due ON schedules (next_run_at) WHERE NOT paused",
        f"""CREATE TABLE schedule_runs (
            id {serial},
            schedule_name TEXT NOT NULL REFERENCES schedules (name) ON DELETE CASCADE,
            slot DOUBLE PRECISION NOT NULL,
            outcome TEXT NOT NULL CHECK (outcome IN ('enqueued', 'skipped', 'failed')),
            job_id BIGINT,
            reason TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            UNIQUE (schedule_name, slot)
        )""",
        "CREATE INDEX schedule_runs_created ON schedule_runs (created_at)",
    ]
    for statement in statements:
        db.execute_sql(statement)
