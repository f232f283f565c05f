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
- On PostgreSQL, `conveyor_claim_limited`: the claim of a job under limits (below).
"""
import peewee as pw

# The claim of one job under limits, on PostgreSQL. A function, because each statement in
# it reads a fresh snapshot: once it holds the lock of a limit (its flow_keys row, taken
# with SKIP LOCKED: a limit another claim holds is passed over this time), its counts see
# every claim made under that limit before, committed. In one statement the counts would
# come from the snapshot taken before the lock was granted, and two claims could both
# take the last place.
#
# p_limits: {type: {"concurrency": n, "rate": [count, period_s], "group_concurrency": n}}
# for the types with limits; a queue's settings come from `queues`. A rate counts the
# starts recorded in flow_starts over its period plus p_guard_s (a claimed job starts a few
# milliseconds after its claim; the guard keeps the starts the handlers see within it).
# Returns the job claimed (at most one), as the claim statements do.
CLAIM_LIMITED = """
CREATE OR REPLACE FUNCTION conveyor_claim_limited(
    p_worker text, p_host text, p_pid integer, p_queues text[], p_limits jsonb,
    p_guard_s double precision)
RETURNS SETOF jobs LANGUAGE plpgsql AS $$
DECLARE
    now_s double precision := extract(epoch from clock_timestamp());
    candidate record;
    lim record;
    passed text[] := '{}';
    fits boolean;
BEGIN
    FOR candidate IN
        SELECT j.id, j.type, j.queue, j.group_key, q.concurrency AS queue_concurrency,
               q.rate_count AS queue_rate_count, q.rate_period_s AS queue_rate_period_s,
               p_limits -> j.type AS type_limits
        FROM jobs AS j LEFT JOIN queues AS q ON q.name = j.queue
        WHERE j.status IN ('available', 'scheduled', 'retryable') AND j.run_at <= now_s
          AND (p_queues IS NULL OR j.queue = ANY(p_queues))
          AND NOT COALESCE(q.paused, FALSE)
          AND (p_limits ? j.type OR q.concurrency IS NOT NULL OR q.rate_count IS NOT NULL)
        ORDER BY j.priority, j.run_at, j.id
        LIMIT 1000
    LOOP
        fits := TRUE;
        FOR lim IN
            SELECT * FROM (VALUES
                ('type:' || candidate.type, 'type',
                 (candidate.type_limits ->> 'concurrency')::int,
                 (candidate.type_limits -> 'rate' ->> 0)::int,
                 (candidate.type_limits -> 'rate' ->> 1)::double precision),
                ('group:' || candidate.type || ':' || candidate.group_key, 'group',
                 (candidate.type_limits ->> 'group_concurrency')::int, NULL::int,
                 NULL::double precision),
                ('queue:' || candidate.queue, 'queue', candidate.queue_concurrency,
                 candidate.queue_rate_count, candidate.queue_rate_period_s)
            ) AS l (key, kind, concurrency, rate_count, rate_period_s)
            WHERE (l.concurrency IS NOT NULL OR l.rate_count IS NOT NULL) AND l.key IS NOT NULL
        LOOP
            IF lim.key = ANY(passed) THEN
                fits := FALSE;
                EXIT;
            END IF;
            PERFORM 1 FROM flow_keys WHERE key = lim.key FOR UPDATE SKIP LOCKED;
            IF NOT FOUND THEN
                INSERT INTO flow_keys (key) VALUES (lim.key) ON CONFLICT DO NOTHING;
                PERFORM 1 FROM flow_keys WHERE key = lim.key FOR UPDATE SKIP LOCKED;
            END IF;
            IF NOT FOUND
               OR lim.concurrency <= (
                   SELECT count(*) FROM jobs
                   WHERE status = 'running' AND CASE lim.kind
                       WHEN 'type' THEN type = candidate.type
                       WHEN 'group' THEN type = candidate.type AND group_key = candidate.group_key
                       ELSE queue = candidate.queue END)
               OR lim.rate_count <= (
                   SELECT count(*) FROM flow_starts
                   WHERE key = lim.key AND started_at > now_s - lim.rate_period_s - p_guard_s)
            THEN
                passed := passed || lim.key;  -- held by another claim, or full: not this time
                fits := FALSE;
                EXIT;
            END IF;
        END LOOP;
        CONTINUE WHEN NOT fits;
        PERFORM 1 FROM jobs
        WHERE id = candidate.id AND status IN ('available', 'scheduled', 'retryable')
        FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        FOR lim IN
            SELECT * FROM (VALUES
                ('type:' || candidate.type, (candidate.type_limits -> 'rate' ->> 1)::double precision),
                ('queue:' || candidate.queue, candidate.queue_rate_period_s)
            ) AS l (key, rate_period_s)
            WHERE l.rate_period_s IS NOT NULL
        LOOP
            DELETE FROM flow_starts
            WHERE key = lim.key AND started_at <= now_s - lim.rate_period_s - p_guard_s;
            INSERT INTO flow_starts (key, started_at) VALUES (lim.key, now_s);
        END LOOP;
        RETURN QUERY
            UPDATE jobs SET status = 'running', attempt = attempt + 1, lease_owner = p_worker,
                            heartbeat_at = now_s, started_at = now_s
            WHERE id = candidate.id
            RETURNING *;
        INSERT INTO attempts (job_id, number, status, worker_id, host, pid, started_at)
        SELECT id, attempt, 'running', p_worker, p_host, p_pid, now_s FROM jobs
        WHERE id = candidate.id;
        RETURN;
    END LOOP;
END $$
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
    if isinstance(db, pw.PostgresqlDatabase):
        db.execute_sql(CLAIM_LIMITED)
