"""A place under a concurrency limit holds a claim, not one job (SPEC §11).

A worker runs one attempt at a time, so the jobs it claims together run one after another:
a claim of several jobs under a limit takes one place, and the limit still bounds the
handlers running at once. On PostgreSQL a place (`flow_slots`) now names every job of the
claim that took it, with their attempts, and is free once none of them runs that attempt
any more; `conveyor_claim_limited` takes up to `p_limit` jobs that share the first one's
limits (type, queue and group) under the places it found, or one job alone when a rate
counts its starts. SQLite counts the claims (a worker and a claim time) running under a
limit instead of the jobs (core/store/sqlite.sql).
"""
import peewee as pw

WAITING = "status IN ('available', 'scheduled', 'retryable')"

# conveyor_free_slot as in 0007, with a place's holder being all the jobs of a claim, and
# one change: a limit whose free places are all locked by claims under way is not full
# yet. Those claims may not use them (their job taken by another claim first), and a
# worker told "full" would sleep until its next poll: it looks again, for a few ms at most.
FREE_SLOT = """
CREATE OR REPLACE FUNCTION conveyor_free_slot(p_key text, p_size integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    found_slot integer;
    taken integer[] := '{}';
    tries integer := 0;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM flow_slots WHERE key = p_key AND slot = p_size) THEN
        INSERT INTO flow_slots (key, slot)
        SELECT p_key, n FROM generate_series(1, p_size) AS n
        ON CONFLICT DO NOTHING;
    END IF;
    LOOP
        SELECT s.slot INTO found_slot FROM flow_slots AS s
        WHERE s.key = p_key AND s.slot <= p_size AND s.slot <> ALL(taken)
          AND NOT conveyor_place_held(s.job_ids, s.attempts)
        ORDER BY s.slot
        LIMIT 1
        FOR UPDATE OF s SKIP LOCKED;
        IF NOT FOUND THEN
            IF tries < 10 AND EXISTS (
                    SELECT 1 FROM flow_slots AS s
                    WHERE s.key = p_key AND s.slot <= p_size AND s.slot <> ALL(taken)
                      AND NOT conveyor_place_held(s.job_ids, s.attempts)) THEN
                tries := tries + 1;  -- a free place, locked by a claim under way
                PERFORM pg_sleep(0.0005);
                CONTINUE;
            END IF;
            RETURN NULL;
        END IF;
        -- Again in a statement of its own: the first read the jobs in a snapshot taken
        -- before the lock, in which a claim that committed meanwhile had not started them.
        IF NOT conveyor_place_held(
                (SELECT job_ids FROM flow_slots WHERE key = p_key AND slot = found_slot),
                (SELECT attempts FROM flow_slots WHERE key = p_key AND slot = found_slot)) THEN
            RETURN found_slot;
        END IF;
        taken := taken || found_slot;  -- taken by a claim that committed meanwhile
    END LOOP;
END $$
"""

# Whether a place's claim still runs: a job of it running the attempt that took the place.
# (PL/pgSQL, whose plans last the session; a SQL function's are made again on every call.)
PLACE_HELD = """
CREATE OR REPLACE FUNCTION conveyor_place_held(p_job_ids bigint[], p_attempts integer[])
RETURNS boolean LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM unnest(p_job_ids, p_attempts) AS held (id, attempt)
                   JOIN jobs AS holder ON holder.id = held.id
                   WHERE holder.status = 'running' AND holder.attempt = held.attempt);
END $$
"""

# conveyor_claim_limited as in 0007, except that a candidate job now stands for the jobs
# that share its limits (its type, queue and group): under the places and rates it passed,
# the claim takes the first p_limit due jobs of those that no other claim holds (no more
# than its rates allow to start now: each start is counted when it is claimed). Claims under way at
# once all begin with the same candidates, so taking it alone would mostly find it taken.
# Its statements are few, as each costs: a candidate's limits are read with it, and the
# jobs are started, their attempts made and their places marked in one statement.
CLAIM_LIMITED = """
CREATE OR REPLACE FUNCTION conveyor_claim_limited(
    p_worker text, p_host text, p_pid integer, p_queues text[], p_limits jsonb,
    p_guard double precision, p_limit integer)
RETURNS SETOF jobs LANGUAGE plpgsql
-- Its statements keep their plans for the session (a worker's session otherwise plans
-- every statement afresh: models.open_database), which would plan a dozen on every call.
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    now_s double precision := extract(epoch from clock_timestamp());
    candidate record;
    passed text[] := '{}';
    fits boolean;
    budget integer;  -- how many more starts the candidate's rates allow now
    started_before integer;
    tries integer;
    lim_key text;
    lim_concurrency integer;
    lim_rate_count integer;
    lim_rate_period_s double precision;
    slot_no integer;
    taken_keys text[];
    taken_slots integer[];
    claimed integer;
    tried text[] := '{}';  -- the (type, queue, group) whose jobs are all taken or held
    -- The places this call locked, by limit: a candidate another claim took first passes
    -- its place on to the next, rather than lock one more that nobody else may then take.
    locked_keys text[] := '{}';
    locked_slots integer[] := '{}';
BEGIN
    FOR candidate IN
        SELECT j.id, j.type, j.queue, j.group_key,
               'type:' || j.type AS type_key,
               (p_limits -> j.type ->> 'concurrency')::int AS type_concurrency,
               (p_limits -> j.type -> 'rate' ->> 0)::int AS type_rate_count,
               (p_limits -> j.type -> 'rate' ->> 1)::double precision AS type_rate_period_s,
               'group:' || j.type || ':' || j.group_key AS group_key_name,
               (p_limits -> j.type ->> 'group_concurrency')::int AS group_concurrency,
               'queue:' || j.queue AS queue_key, q.concurrency AS queue_concurrency,
               q.rate_count AS queue_rate_count, q.rate_period_s AS queue_rate_period_s,
               j.type || ' ' || j.queue || ' ' || COALESCE(j.group_key, '') AS alike
        FROM jobs AS j LEFT JOIN queues AS q ON q.name = j.queue
        WHERE j.status IN ('available', 'scheduled', 'retryable') AND j.held
          AND j.run_at <= now_s AND (p_queues IS NULL OR j.queue = ANY(p_queues))
          AND (j.expires_at IS NULL OR j.expires_at > now_s)
          AND NOT COALESCE(q.paused, FALSE)
        ORDER BY j.priority, j.run_at, j.id
        LIMIT 1000
    LOOP
        CONTINUE WHEN candidate.type_key = ANY(passed) OR candidate.queue_key = ANY(passed)
                   OR candidate.group_key_name = ANY(passed) OR candidate.alike = ANY(tried);
        fits := TRUE;
        budget := p_limit;
        taken_keys := '{}';
        taken_slots := '{}';
        FOR limit_no IN 1..3 LOOP  -- its type's limits, its (type, group)'s, its queue's
            lim_key := CASE limit_no WHEN 1 THEN candidate.type_key
                                     WHEN 2 THEN candidate.group_key_name
                                     ELSE candidate.queue_key END;
            lim_concurrency := CASE limit_no WHEN 1 THEN candidate.type_concurrency
                                             WHEN 2 THEN candidate.group_concurrency
                                             ELSE candidate.queue_concurrency END;
            lim_rate_count := CASE limit_no WHEN 1 THEN candidate.type_rate_count
                                            WHEN 3 THEN candidate.queue_rate_count END;
            lim_rate_period_s := CASE limit_no WHEN 1 THEN candidate.type_rate_period_s
                                               WHEN 3 THEN candidate.queue_rate_period_s END;
            CONTINUE WHEN lim_key IS NULL OR (lim_concurrency IS NULL AND lim_rate_count IS NULL);
            IF lim_concurrency IS NOT NULL THEN
                slot_no := locked_slots[array_position(locked_keys, lim_key)];
                IF slot_no IS NULL THEN
                    slot_no := conveyor_free_slot(lim_key, lim_concurrency);
                    locked_keys := locked_keys || lim_key;
                    locked_slots := locked_slots || slot_no;
                END IF;
                IF slot_no IS NULL THEN
                    passed := passed || lim_key;  -- full
                    fits := FALSE;
                    EXIT;
                END IF;
                taken_keys := taken_keys || lim_key;
                taken_slots := taken_slots || slot_no;
            END IF;
            IF lim_rate_count IS NOT NULL THEN
                -- The rate's lock, held to the end of the step: a claim counting the same
                -- rate meanwhile is waited for, a few ms at most (no wait that could
                -- deadlock with another claim's locks), then the rate is passed over.
                tries := 0;
                LOOP
                    PERFORM 1 FROM flow_keys WHERE key = lim_key FOR UPDATE SKIP LOCKED;
                    EXIT WHEN FOUND;
                    INSERT INTO flow_keys (key) VALUES (lim_key) ON CONFLICT DO NOTHING;
                    PERFORM 1 FROM flow_keys WHERE key = lim_key FOR UPDATE SKIP LOCKED;
                    EXIT WHEN FOUND OR tries >= 20;
                    tries := tries + 1;
                    PERFORM pg_sleep(0.0005);
                END LOOP;
                IF FOUND THEN
                    -- in a snapshot of its own, taken with the lock held: every start
                    -- counted under this rate before, committed
                    SELECT count(*) INTO started_before FROM flow_starts
                    WHERE key = lim_key AND started_at > now_s - lim_rate_period_s * (1 + p_guard);
                    budget := least(budget, lim_rate_count - started_before);
                END IF;
                IF NOT FOUND OR budget <= 0 THEN
                    passed := passed || lim_key;  -- held by another claim, or used up
                    fits := FALSE;
                    EXIT;
                END IF;
                DELETE FROM flow_starts
                WHERE key = lim_key AND started_at <= now_s - lim_rate_period_s * (1 + p_guard);
            END IF;
        END LOOP;
        CONTINUE WHEN NOT fits;
        RETURN QUERY
        WITH chosen AS (
            SELECT id FROM jobs
            WHERE status IN ('available', 'scheduled', 'retryable') AND held
              AND type = candidate.type AND queue = candidate.queue
              AND COALESCE(group_key, '') = COALESCE(candidate.group_key, '')
              AND run_at <= now_s AND (expires_at IS NULL OR expires_at > now_s)
            ORDER BY priority, run_at, id
            LIMIT greatest(budget, 1)
            FOR UPDATE SKIP LOCKED
        ), started AS (
            UPDATE jobs SET status = 'running', attempt = attempt + 1, lease_owner = p_worker,
                            heartbeat_at = now_s, started_at = now_s
            WHERE id IN (SELECT id FROM chosen)
            RETURNING *
        ), attempts_made AS (
            INSERT INTO attempts (job_id, number, status, worker_id, host, pid, started_at)
            SELECT id, attempt, 'running', p_worker, p_host, p_pid, now_s FROM started
        ), places AS (
            UPDATE flow_slots AS s
            SET job_ids = (SELECT array_agg(id ORDER BY id) FROM started),
                attempts = (SELECT array_agg(attempt ORDER BY id) FROM started)
            FROM unnest(taken_keys, taken_slots) AS t (key, slot)
            WHERE s.key = t.key AND s.slot = t.slot AND EXISTS (SELECT 1 FROM started)
        )
        SELECT * FROM started ORDER BY priority, run_at, id;
        GET DIAGNOSTICS claimed = ROW_COUNT;
        IF claimed = 0 THEN
            tried := tried || candidate.alike;  -- all taken by other claims first
            CONTINUE;
        END IF;
        INSERT INTO flow_starts (key, started_at)
        SELECT rated.key, now_s
        FROM unnest(ARRAY[CASE WHEN candidate.type_rate_count IS NOT NULL THEN candidate.type_key END,
                          CASE WHEN candidate.queue_rate_count IS NOT NULL THEN candidate.queue_key END])
             AS rated (key), generate_series(1, claimed)
        WHERE rated.key IS NOT NULL;
        RETURN;
    END LOOP;
END $$
"""


def up(migrator, db):
    # The jobs a claim under limits takes together: those that share their limits.
    # ('' is no group: a group has 1 to 200 characters.)
    db.execute_sql(f"""CREATE INDEX jobs_held_alike ON jobs (type, queue, (COALESCE(group_key, '')),
                                                             priority, run_at, id)
                       WHERE {WAITING} AND held""")
    if not isinstance(db, pw.PostgresqlDatabase):
        return  # SQLite keeps no places: it counts the claims running (sqlite.sql)
    for statement in (
        "ALTER TABLE flow_slots ADD COLUMN job_ids BIGINT[], ADD COLUMN attempts INTEGER[]",
        """UPDATE flow_slots SET job_ids = ARRAY[job_id], attempts = ARRAY[attempt]
           WHERE job_id IS NOT NULL""",
        PLACE_HELD,
        FREE_SLOT,
        "DROP FUNCTION conveyor_claim_limited(text, text, integer, text[], jsonb, double precision)",
        CLAIM_LIMITED,
        "ALTER TABLE flow_slots DROP COLUMN job_id, DROP COLUMN attempt",
    ):
        db.execute_sql(statement)
