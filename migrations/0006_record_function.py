"""The one transition of a running job, on PostgreSQL: conveyor_record(reports).

A worker's report, the reaper, the supervisor that saw its worker die and a worker giving
back what it never began all record outcomes through it (core/store/postgres.sql `step`
calls it). An outcome moves its job only while the job still runs that attempt under that
lease (the ownership guard: status, attempt and lease_owner as the report knew them). An
outcome that finds the job moved on is refused; when it came from the worker itself (fence)
its attempt is marked fenced. A cancellation requested while the attempt ran wins over a
retry or a dead letter; a refunded attempt (released: it never began) gives its budget back.

A function rather than part of the step statement: a worker's session plans each statement
afresh (models.open_database), and a claim with nothing to report would pay for planning
these three updates; here they are not even reached. SQLite's version is `move`,
`end_attempt` and `fence` in core/store/sqlite.sql. To change it, add a migration that
replaces it (CREATE OR REPLACE FUNCTION).
"""
import peewee as pw

# p_reports: a JSON array of objects, as core.jobs._reported makes them. Answers one row
# per moved job ("moved": id, status, dead_reason, run_at, finished_at, duration_s) and per
# refused report ("refused": id).
RECORD = """
CREATE OR REPLACE FUNCTION conveyor_record(p_reports json)
RETURNS TABLE (kind text, "row" json) LANGUAGE plpgsql AS $$
#variable_conflict use_column
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
            RETURNING attempts.job_id, attempts.finished_at - attempts.started_at AS duration_s),
        refused AS (
            UPDATE attempts SET fenced = TRUE
            FROM reported AS r
            WHERE r.fence AND attempts.job_id = r.id AND attempts.number = r.attempt
              AND attempts.status <> r.attempt_status
              AND NOT EXISTS (SELECT 1 FROM moved AS m WHERE m.id = r.id)
            RETURNING attempts.job_id AS id)
        SELECT 'moved'::text, to_json(done)
        FROM (SELECT moved.*, ended.duration_s
              FROM moved LEFT JOIN ended ON ended.job_id = moved.id) AS done
        UNION ALL
        SELECT 'refused'::text, to_json(refused) FROM refused;
END $$
"""


def up(migrator, db):
    if isinstance(db, pw.PostgresqlDatabase):
        db.execute_sql(RECORD)
