"""The worker's step keeps its query plans (issue 17: the drain).

A worker's session plans every statement afresh (models.open_database: a generic plan made
while `jobs` or `attempts` was small, a scan of the whole table, would otherwise stay
cached as they grow). On the step that cost more than a third of PostgreSQL's time in a
drain (perf: standard_planner 34 %): the step statement itself (0.7 ms, half its
execution for 20 jobs), the statements of conveyor_record, and, once per claimed job, the
foreign-key check of its new attempt (19 %).

Now the step is one function, conveyor_step, and the claim and the record are
conveyor_claim and conveyor_record, each planned once per session (force_generic_plan).
The claim's and the record's statements can only be planned one way whatever the tables'
sizes: no sequential scan, no hash or merge join (the enable_* settings), so each is a
nested loop from the jobs in hand to the rows they name by key, through an index. (A table
with no index for a query, such as `queues`, is still scanned, at a cost these settings
make huge: so JIT compilation, which that cost would set off on every call, is off there
too.) A claim's choice of jobs, conveyor_next, is a query per way of choosing (fair
share's turns, every queue, some queues), each read in the order of one index.

conveyor_record also marked refused outcomes in the same statement that recorded the
others, a join that walked `attempts` on every step however few reports it carried.
Refusals are rare: they are now marked by a second statement, run only when some report
did not move its job.
"""
import peewee as pw

# The ids of up to p_limit jobs due at p_now for a claim, locked (SKIP LOCKED: another
# claim's are passed over): a job not held and not in a paused or limited queue, not
# expired; of p_queues (null: every queue); when p_turns is given (fair share), those of
# its ids still due, in its order, else the oldest first (priority, run_at, id). Each
# query reads one index in its order (jobs_pkey, jobs_claim, jobs_claim_by_queue), so its
# generic plan stops after p_limit rows; several queues are read one by one and merged.
# It runs within conveyor_claim, under that function's planner settings.
NEXT = """
CREATE OR REPLACE FUNCTION conveyor_next(p_queues text[], p_turns bigint[], p_limit integer,
                                         p_now float8)
RETURNS SETOF bigint LANGUAGE plpgsql AS $$
BEGIN
    IF p_turns IS NOT NULL THEN
        RETURN QUERY
            SELECT id FROM jobs
            WHERE id = ANY(p_turns)
              AND status IN ('available', 'scheduled', 'retryable') AND NOT held
              AND run_at <= p_now AND (expires_at IS NULL OR expires_at > p_now)
              AND (p_queues IS NULL OR queue = ANY(p_queues))
              AND queue NOT IN (SELECT name FROM queues
                                WHERE paused OR concurrency IS NOT NULL OR rate_count IS NOT NULL)
            ORDER BY array_position(p_turns, id)
            LIMIT p_limit
            FOR UPDATE SKIP LOCKED;
    ELSIF p_queues IS NULL THEN
        RETURN QUERY
            SELECT id FROM jobs
            WHERE status IN ('available', 'scheduled', 'retryable') AND NOT held
              AND run_at <= p_now AND (expires_at IS NULL OR expires_at > p_now)
              AND queue NOT IN (SELECT name FROM queues
                                WHERE paused OR concurrency IS NOT NULL OR rate_count IS NOT NULL)
            ORDER BY priority, run_at, id
            LIMIT p_limit
            FOR UPDATE SKIP LOCKED;
    ELSE
        RETURN QUERY
            SELECT due.id
            FROM unnest(p_queues) AS served(name)
            CROSS JOIN LATERAL (
                SELECT id, priority, run_at FROM jobs
                WHERE queue = served.name
                  AND status IN ('available', 'scheduled', 'retryable') AND NOT held
                  AND run_at <= p_now AND (expires_at IS NULL OR expires_at > p_now)
                  AND served.name NOT IN (
                      SELECT name FROM queues
                      WHERE paused OR concurrency IS NOT NULL OR rate_count IS NOT NULL)
                ORDER BY queue, priority, run_at, id  -- one queue: jobs_claim_by_queue's order
                LIMIT p_limit
                FOR UPDATE SKIP LOCKED) AS due
            ORDER BY due.priority, due.run_at, due.id
            LIMIT p_limit;
    END IF;
END $$
"""

# Start up to p_limit jobs (conveyor_next chose them) for worker p_worker: each `running`
# under the worker's lease, its attempt begun. Answers what a worker reads of each job.
CLAIM = """
CREATE OR REPLACE FUNCTION conveyor_claim(p_worker text, p_host text, p_pid integer,
                                          p_queues text[], p_turns bigint[], p_limit integer)
RETURNS TABLE (id bigint, type text, queue text, payload text, priority integer,
               run_at float8, max_attempts integer, timeout_s float8, backoff_base_s float8,
               backoff_max_s float8, attempt integer, attempt_base integer,
               idempotency_key text, started_at float8, cancel_requested_at float8,
               lease_owner text, group_key text, api_key_id bigint)
LANGUAGE plpgsql ROWS 10
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off
SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off AS $$
#variable_conflict use_column
BEGIN
    IF p_limit <= 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
        WITH clock AS MATERIALIZED (SELECT extract(epoch from clock_timestamp())::float8 AS now),
        claimed AS (
            UPDATE jobs SET status = 'running', attempt = jobs.attempt + 1, lease_owner = p_worker,
                            heartbeat_at = clock.now, started_at = clock.now
            FROM clock, conveyor_next(p_queues, p_turns, p_limit, clock.now) AS next(id)
            WHERE jobs.id = next.id
            RETURNING jobs.id, jobs.type, jobs.queue, jobs.payload, jobs.priority, jobs.run_at,
                      jobs.max_attempts, jobs.timeout_s, jobs.backoff_base_s,
                      jobs.backoff_max_s, jobs.attempt, jobs.attempt_base,
                      jobs.idempotency_key, jobs.started_at, jobs.cancel_requested_at,
                      jobs.lease_owner, jobs.group_key, jobs.api_key_id),
        started AS (
            INSERT INTO attempts (job_id, number, status, worker_id, host, pid, started_at)
            SELECT claimed.id, claimed.attempt, 'running', claimed.lease_owner, p_host, p_pid,
                   claimed.started_at
            FROM claimed)
        SELECT * FROM claimed;
END $$
"""

# As migrations/0006_record_function.py, with its plans kept and refused reports marked
# apart (see above).
RECORD = """
CREATE OR REPLACE FUNCTION conveyor_record(p_reports json)
RETURNS TABLE (kind text, "row" json) LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off
SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off AS $$
#variable_conflict use_column
DECLARE
    moved_count integer;
BEGIN
    IF json_array_length(p_reports) = 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
        WITH clock AS MATERIALIZED (SELECT extract(epoch from clock_timestamp())::float8 AS now),
        reported AS (
            SELECT * FROM json_to_recordset(p_reports) AS r(
                id bigint, attempt int, lease_owner text, status text, delay_s float8, result text,
                last_error text, dead_reason text, attempt_status text, error_type text,
                error_message text, traceback text, started_at float8, finished_at float8,
                refund int, fence boolean)),
        moved AS (
            UPDATE jobs SET
                status = CASE WHEN jobs.cancel_requested_at IS NOT NULL AND r.status <> 'succeeded'
                              THEN 'cancelled' ELSE r.status END,
                result = CASE WHEN r.status = 'succeeded' THEN r.result ELSE jobs.result END,
                last_error = COALESCE(r.last_error, jobs.last_error),
                dead_reason = CASE WHEN jobs.cancel_requested_at IS NOT NULL AND r.status <> 'succeeded'
                                   THEN NULL ELSE r.dead_reason END,
                run_at = CASE WHEN r.delay_s IS NULL THEN jobs.run_at
                              ELSE COALESCE(r.finished_at, clock.now) + r.delay_s END,
                finished_at = CASE WHEN jobs.cancel_requested_at IS NOT NULL
                                        OR r.status IN ('succeeded', 'dead', 'cancelled')
                                   THEN COALESCE(r.finished_at, clock.now) END,
                attempt_base = jobs.attempt_base + r.refund,
                lease_owner = NULL, heartbeat_at = NULL
            FROM reported AS r, clock
            WHERE jobs.id = r.id
              AND jobs.status = 'running' AND jobs.attempt = r.attempt AND jobs.lease_owner = r.lease_owner
            RETURNING jobs.id, jobs.status, jobs.dead_reason, jobs.run_at, jobs.finished_at),
        ended AS (
            UPDATE attempts SET status = r.attempt_status,
                started_at = COALESCE(r.started_at, attempts.started_at),
                finished_at = COALESCE(r.finished_at, clock.now),
                error_type = r.error_type, error_message = r.error_message, traceback = r.traceback
            FROM reported AS r JOIN moved AS m ON m.id = r.id, clock
            WHERE attempts.job_id = r.id AND attempts.number = r.attempt AND attempts.status = 'running'
            RETURNING attempts.job_id, attempts.finished_at - attempts.started_at AS duration_s)
        SELECT 'moved'::text, to_json(done)
        FROM (SELECT moved.*, ended.duration_s
              FROM moved LEFT JOIN ended ON ended.job_id = moved.id) AS done;
    GET DIAGNOSTICS moved_count = ROW_COUNT;
    IF moved_count = json_array_length(p_reports) THEN
        RETURN;
    END IF;
    -- A report that moved nothing: its attempt was recorded before (by this same report,
    -- sent again: the attempt shows its status), or it is refused. The attempts of those
    -- that moved their jobs show their reported status now, so they are not taken here.
    RETURN QUERY
        WITH refused AS (
            UPDATE attempts SET fenced = TRUE
            FROM json_to_recordset(p_reports) AS r(id bigint, attempt int, attempt_status text,
                                                   fence boolean)
            WHERE r.fence AND attempts.job_id = r.id AND attempts.number = r.attempt
              AND attempts.status <> r.attempt_status
            RETURNING attempts.job_id AS id)
        SELECT 'refused'::text, to_json(refused) FROM refused;
END $$
"""

# The worker's step (core/store/postgres.sql `step`): first the claim (conveyor_claim), then
# the outcomes reported (conveyor_record, the one transition of a running job), then, when
# the types have limits (p_limits) and the claim found fewer than p_limit jobs, the rest
# under limits (conveyor_claim_limited, migrations/0010_places_hold_claims.py): the places
# this step's reports free are this worker's to take again, in the same transaction, before
# another sees them.
STEP = """
CREATE OR REPLACE FUNCTION conveyor_step(p_reports json, p_worker text, p_host text,
                                         p_pid integer, p_queues text[], p_turns bigint[],
                                         p_limit integer, p_limits jsonb, p_guard float8)
RETURNS TABLE (kind text, "row" json) LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    claimed_count integer := 0;
BEGIN
    IF p_limit > 0 THEN
        RETURN QUERY
            SELECT 'claimed'::text, to_json(claimed)
            FROM conveyor_claim(p_worker, p_host, p_pid, p_queues, p_turns, p_limit) AS claimed;
        GET DIAGNOSTICS claimed_count = ROW_COUNT;
    END IF;
    RETURN QUERY SELECT recorded.kind, recorded."row" FROM conveyor_record(p_reports) AS recorded;
    IF p_limits IS NOT NULL AND p_limit > claimed_count THEN
        RETURN QUERY
            SELECT 'limited'::text, to_json(limited)
            FROM (SELECT id, type, queue, payload, priority, run_at, max_attempts, timeout_s,
                         backoff_base_s, backoff_max_s, attempt, attempt_base, idempotency_key,
                         started_at, cancel_requested_at, lease_owner, group_key, api_key_id
                  FROM conveyor_claim_limited(p_worker, p_host, p_pid, p_queues, p_limits,
                                              p_guard, p_limit - claimed_count)) AS limited;
    END IF;
END $$
"""


def up(migrator, db):
    if isinstance(db, pw.PostgresqlDatabase):
        db.execute_sql(NEXT)
        db.execute_sql(CLAIM)
        db.execute_sql(RECORD)
        db.execute_sql(STEP)
