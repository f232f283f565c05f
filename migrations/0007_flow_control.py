"""Flow control (SPEC §11): a job's group, queue settings, and what the limits are checked
against.

- `jobs.group_key`: the `group` a job was submitted with (group_concurrency counts by it).
- `jobs.held`: the job is under a limit (or in a paused queue), so only the claim under
  limits takes it; the indexes a plain claim reads leave held jobs out.
- `queues`: one row per queue an operator has set: paused, concurrency, rate (a count of
  starts per period). A queue with no row has no settings.
- `flow_slots`: on PostgreSQL, the places under each concurrency limit (a type, a type and
  group, a queue), one row each, held by the job that took it while it runs that attempt.
- `flow_keys`: one row per rate limit, which a claim locks while it counts the starts.
- `flow_starts`: when each attempt under a rate limit started, by limit; a claim counts
  those within the period (a sliding window), and old ones are pruned.
- `jobs_running_type`: running jobs by type and group, for the counts of running attempts.
- On PostgreSQL, `conveyor_claim_limited`: the claim of a job under limits (below).
"""
import peewee as pw

WAITING = "status IN ('available', 'scheduled', 'retryable')"

# A place under a concurrency limit (p_key, at most p_size places): one of its flow_slots
# rows whose job no longer runs the attempt that took it, locked; the rows are made on
# first use. Null when none is free. Claims take different places at once instead of
# queueing for the limit. A row found free is locked (SKIP LOCKED: a place another claim
# is taking is not free), then checked again in a statement of its own: the first reads
# the jobs in a snapshot taken before the lock, in which a claim that committed meanwhile
# had not yet started its job.
FREE_SLOT = """
CREATE OR REPLACE FUNCTION conveyor_free_slot(p_key text, p_size integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    found_slot integer;
    taken integer[] := '{}';
BEGIN
    IF NOT EXISTS (SELECT 1 FROM flow_slots WHERE key = p_key AND slot = p_size) THEN
        INSERT INTO flow_slots (key, slot)
        SELECT p_key, n FROM generate_series(1, p_size) AS n
        ON CONFLICT DO NOTHING;
    END IF;
    LOOP
        SELECT s.slot INTO found_slot FROM flow_slots AS s
        WHERE s.key = p_key AND s.slot <= p_size AND s.slot <> ALL(taken)
          AND NOT EXISTS (SELECT 1 FROM jobs AS holder
                          WHERE holder.id = s.job_id AND holder.status = 'running'
                            AND holder.attempt = s.attempt)
        ORDER BY s.slot
        LIMIT 1
        FOR UPDATE OF s SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
        IF NOT EXISTS (SELECT 1 FROM flow_slots AS s JOIN jobs AS holder ON holder.id = s.job_id
                       WHERE s.key = p_key AND s.slot = found_slot
                         AND holder.status = 'running' AND holder.attempt = s.attempt) THEN
            RETURN found_slot;
        END IF;
        taken := taken || found_slot;  -- taken by a claim that committed meanwhile
    END LOOP;
END $$
"""

# The claim of one job under limits, on PostgreSQL: the first due job whose limits all have
# room. A concurrency limit gives it a free place (conveyor_free_slot); a rate limit is
# locked (its flow_keys row, SKIP LOCKED: a rate another claim is counting is passed over
# this time) and its starts counted. A function, because each statement in it reads a
# fresh snapshot: once a claim holds a rate's lock, its count sees every start recorded
# under that rate before, committed; in one statement the count would come from the
# snapshot taken before the lock was granted, and two claims could both take the last start.
#
# p_limits: {type: {"concurrency": n, "rate": [count, period_s], "group_concurrency": n}}
# for the types with limits; a queue's settings come from `queues`. A rate counts the
# starts recorded in flow_starts over its period and p_guard of it more (a claimed job
# starts some milliseconds after its claim; the guard keeps the starts the handlers see
# within the rate).
# Returns the job claimed (at most one), as the claim statements do.
CLAIM_LIMITED = """
CREATE OR REPLACE FUNCTION conveyor_claim_limited(
    p_worker text, p_host text, p_pid integer, p_queues text[], p_limits jsonb,
    p_guard double precision)
RETURNS SETOF jobs LANGUAGE plpgsql AS $$
DECLARE
    now_s double precision := extract(epoch from clock_timestamp());
    candidate record;
    lim record;
    passed text[] := '{}';
    fits boolean;
    slot_no integer;
    taken_keys text[];
    taken_slots integer[];
    claimed_attempt integer;
BEGIN
    FOR candidate IN
        SELECT j.id, j.type, j.queue, j.group_key, q.concurrency AS queue_concurrency,
               q.rate_count AS queue_rate_count, q.rate_period_s AS queue_rate_period_s,
               p_limits -> j.type AS type_limits
        FROM jobs AS j LEFT JOIN queues AS q ON q.name = j.queue
        WHERE j.status IN ('available', 'scheduled', 'retryable') AND j.held
          AND j.run_at <= now_s AND (p_queues IS NULL OR j.queue = ANY(p_queues))
          AND NOT COALESCE(q.paused, FALSE)
        ORDER BY j.priority, j.run_at, j.id
        LIMIT 1000
    LOOP
        fits := TRUE;
        taken_keys := '{}';
        taken_slots := '{}';
        FOR lim IN
            SELECT * FROM (VALUES
                ('type:' || candidate.type,
                 (candidate.type_limits ->> 'concurrency')::int,
                 (candidate.type_limits -> 'rate' ->> 0)::int,
                 (candidate.type_limits -> 'rate' ->> 1)::double precision),
                ('group:' || candidate.type || ':' || candidate.group_key,
                 (candidate.type_limits ->> 'group_concurrency')::int, NULL::int,
                 NULL::double precision),
                ('queue:' || candidate.queue, candidate.queue_concurrency,
                 candidate.queue_rate_count, candidate.queue_rate_period_s)
            ) AS l (key, concurrency, rate_count, rate_period_s)
            WHERE (l.concurrency IS NOT NULL OR l.rate_count IS NOT NULL) AND l.key IS NOT NULL
        LOOP
            IF lim.key = ANY(passed) THEN
                fits := FALSE;
                EXIT;
            END IF;
            IF lim.concurrency IS NOT NULL THEN
                slot_no := conveyor_free_slot(lim.key, lim.concurrency);
                IF slot_no IS NULL THEN
                    passed := passed || lim.key;  -- full, or its free places being taken
                    fits := FALSE;
                    EXIT;
                END IF;
                taken_keys := taken_keys || lim.key;
                taken_slots := taken_slots || slot_no;
            END IF;
            IF lim.rate_count IS NOT NULL THEN
                PERFORM 1 FROM flow_keys WHERE key = lim.key FOR UPDATE SKIP LOCKED;
                IF NOT FOUND THEN
                    INSERT INTO flow_keys (key) VALUES (lim.key) ON CONFLICT DO NOTHING;
                    PERFORM 1 FROM flow_keys WHERE key = lim.key FOR UPDATE SKIP LOCKED;
                END IF;
                IF NOT FOUND OR lim.rate_count <= (
                    SELECT count(*) FROM flow_starts
                    WHERE key = lim.key AND started_at > now_s - lim.rate_period_s * (1 + p_guard))
                THEN
                    passed := passed || lim.key;  -- held by another claim, or used up
                    fits := FALSE;
                    EXIT;
                END IF;
                DELETE FROM flow_starts
                WHERE key = lim.key AND started_at <= now_s - lim.rate_period_s * (1 + p_guard);
            END IF;
        END LOOP;
        CONTINUE WHEN NOT fits;
        UPDATE jobs SET status = 'running', attempt = attempt + 1, lease_owner = p_worker,
                        heartbeat_at = now_s, started_at = now_s
        WHERE id = (SELECT id FROM jobs
                    WHERE id = candidate.id AND status IN ('available', 'scheduled', 'retryable')
                    FOR UPDATE SKIP LOCKED)
        RETURNING attempt INTO claimed_attempt;
        CONTINUE WHEN NOT FOUND;
        UPDATE flow_slots AS s SET job_id = candidate.id, attempt = claimed_attempt
        FROM unnest(taken_keys, taken_slots) AS t (key, slot)
        WHERE s.key = t.key AND s.slot = t.slot;
        IF (candidate.type_limits -> 'rate' ->> 0) IS NOT NULL THEN
            INSERT INTO flow_starts (key, started_at) VALUES ('type:' || candidate.type, now_s);
        END IF;
        IF candidate.queue_rate_count IS NOT NULL THEN
            INSERT INTO flow_starts (key, started_at) VALUES ('queue:' || candidate.queue, now_s);
        END IF;
        INSERT INTO attempts (job_id, number, status, worker_id, host, pid, started_at)
        VALUES (candidate.id, claimed_attempt, 'running', p_worker, p_host, p_pid, now_s);
        RETURN QUERY SELECT * FROM jobs WHERE id = candidate.id;
        RETURN;
    END LOOP;
END $$
"""


def up(migrator, db):
    for statement in (
        "ALTER TABLE jobs ADD COLUMN group_key TEXT",
        # Held: under a limit of its type or queue (or in a paused queue). A plain claim
        # reads only the jobs not held, so a held backlog never slows it; the claim under
        # limits reads only the held ones.
        "ALTER TABLE jobs ADD COLUMN held BOOLEAN NOT NULL DEFAULT FALSE",
        "DROP INDEX jobs_claim",
        "DROP INDEX jobs_claim_by_queue",
        f"CREATE INDEX jobs_claim ON jobs (priority, run_at, id) WHERE {WAITING} AND NOT held",
        f"""CREATE INDEX jobs_claim_by_queue ON jobs (queue, priority, run_at, id)
            WHERE {WAITING} AND NOT held""",
        f"CREATE INDEX jobs_held ON jobs (priority, run_at, id) WHERE {WAITING} AND held",
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
        """CREATE TABLE flow_slots (
            key TEXT NOT NULL,
            slot INTEGER NOT NULL,
            job_id BIGINT,
            attempt INTEGER,
            PRIMARY KEY (key, slot)
        )""",
        """CREATE TABLE flow_starts (
            key TEXT NOT NULL,
            started_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX flow_starts_key ON flow_starts (key, started_at)",
        "CREATE INDEX jobs_running_type ON jobs (type, group_key) WHERE status = 'running'",
    ):
        db.execute_sql(statement)
    if isinstance(db, pw.PostgresqlDatabase):
        db.execute_sql(FREE_SLOT)
        db.execute_sql(CLAIM_LIMITED)
