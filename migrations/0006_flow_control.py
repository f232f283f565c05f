"""Flow control (SPEC §11): a job's group, queue settings, and what the limits are checked
against.

- `jobs.group_key`: the `group` a job was submitted with (group_concurrency counts by it).
- `queues`: one row per queue an operator has set: paused, concurrency, rate (a count of
  starts per period). A queue with no row has no settings.
- `flow_keys`: one row per limit (a type, a type and group, a queue) that a claim locks, so
  that two claims never both take the last free place under the same limit.
- `flow_starts`: when each attempt under a rate limit started, by limit; a claim counts
  those within the period (a sliding window), and old ones are pruned.
- `jobs_running_type`: running jobs by type and group, for the counts of running attempts.
"""


def up(migrator, db):
    for statement in (
        "ALTER TABLE jobs ADD COLUMN group_key TEXT",
        """CREATE TABLE queues (
            name TEXT PRIMARY KEY,
            paused BOOLEAN NOT NULL DEFAULT FALSE,
            concurrency INTEGER CHECK (concurrency >= 1),
            rate_count INTEGER CHECK (rate_count >= 1),
            rate_period_s DOUBLE PRECISION CHECK (rate_period_s > 0),
            updated_at DOUBLE PRECISION NOT NULL,
            CHECK ((rate_count IS NULL) = (rate_period_s IS NULL))
        )""",
        "CREATE TABLE flow_keys (key TEXT PRIMARY KEY)",
        """CREATE TABLE flow_starts (
            key TEXT NOT NULL,
            started_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX flow_starts_key ON flow_starts (key, started_at)",
        "CREATE INDEX jobs_running_type ON jobs (type, group_key) WHERE status = 'running'",
    ):
        db.execute_sql(statement)
