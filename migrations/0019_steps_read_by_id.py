"""A worker's step reads the jobs it names by their ids, whatever else runs (issue 17: the
drain).

conveyor_record moved a reported job only while `status = 'running'` and its attempt and
lease were those reported. That condition is also the predicate of `jobs_running`, and the
session's generic plan (made when few jobs ran) read the running jobs through that index
and matched each against every report: every running job of every worker, host and
supervisor, read at each step and compared with each report (a drain of 4 workers read 10
index entries and 5 rows a job there, and a batch of 50 cost more a job than one of 20).
The lease says as much: a job has a lease_owner exactly while it runs (jobs_check), so the
move now names the job's attempt and lease only, and the plan can only reach the jobs by
their ids (jobs_pkey), a probe per report.

So does the claim under a concurrency limit, asking whether a place's claim still runs
(conveyor_place_held, migrations/0010_places_hold_claims.py): it read every running job for
each place it looked at; it now looks up the place's jobs by id, running while they hold a
lease, and, as the step's other functions, by no other way, whatever the plan it keeps for
the session was made for.
"""
import peewee as pw

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
              AND jobs.attempt = r.attempt AND jobs.lease_owner = r.lease_owner  -- so running (jobs_check)
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

PLACE_HELD = """
CREATE OR REPLACE FUNCTION conveyor_place_held(p_job_ids bigint[], p_attempts integer[])
RETURNS boolean LANGUAGE plpgsql STABLE
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM unnest(p_job_ids, p_attempts) AS held (id, attempt)
                   JOIN jobs AS holder ON holder.id = held.id
                   WHERE holder.lease_owner IS NOT NULL  -- so running (jobs_check)
                     AND holder.attempt = held.attempt);
END $$
"""


def up(migrator, db):
    if isinstance(db, pw.PostgresqlDatabase):
        db.execute_sql(RECORD)
        db.execute_sql(PLACE_HELD)

