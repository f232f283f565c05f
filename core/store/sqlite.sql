-- The SQLite statements of the core, each whole under its name (core/store/queries.py
-- loads them; core/store/sqlite.py runs them, inside BEGIN IMMEDIATE where several make one
-- change). Parameters are named, :name. SQLite lives on the host that runs it, so its
-- clock is the caller's: :now is time.time() of the process (SQLite's own 'now' is cut to
-- the millisecond).
--
-- The status words are literals (core/status.py names them; tests/test_store.py checks the
-- two agree): SQLite uses a partial index only when the query spells out its predicate.

-- name: insert_jobs
-- Store jobs given as one JSON array of arrays, in the order of core.store.sqlite.insert_jobs;
-- a used idempotency key (the unique index jobs_idempotency) is skipped, and so is a unique
-- key a job of the same type holds (jobs_unique): the caller reads the job they name. A job of a type in :limited_types or of a paused or limited queue is
-- stored held. ("WHERE true": an upsert's SELECT needs a WHERE, or SQLite reads ON as the
-- start of a join.)
INSERT INTO jobs (type, queue, payload, priority, run_at, status, max_attempts, timeout_s,
                  backoff_base_s, backoff_max_s, idempotency_key, request_hash, group_key,
                  held, api_key_id, created_at, unique_key, unique_while, unique_hold,
                  expires_at, parent_id)
SELECT job.value ->> 0, job.value ->> 1, job.value ->> 13, job.value ->> 2,
       COALESCE(job.value ->> 3, :now + (job.value ->> 4)),
       CASE WHEN COALESCE(job.value ->> 3, :now + (job.value ->> 4)) > :now
            THEN 'scheduled' ELSE 'available' END,
       job.value ->> 5, job.value ->> 6, job.value ->> 7, job.value ->> 8, job.value ->> 9,
       job.value ->> 10, job.value ->> 11,
       (job.value ->> 0) IN (SELECT value FROM json_each(:limited_types))
           OR (job.value ->> 1) IN (SELECT name FROM queues
                                    WHERE paused OR concurrency IS NOT NULL
                                       OR rate_count IS NOT NULL),
       :api_key_id, :now, job.value ->> '$[12][0]', job.value ->> '$[12][1]',
       job.value ->> '$[12][0]',
       COALESCE(job.value ->> '$[12][3]', :now + (job.value ->> '$[12][2]')),
       job.value ->> '$[12][4]'
FROM json_each(:jobs) AS job
WHERE true
ON CONFLICT DO NOTHING
RETURNING id, idempotency_key, status, run_at, created_at, held, type, unique_hold, expires_at;

-- name: take_callbacks
-- What postgres.sql's take_callbacks does: under BEGIN IMMEDIATE this process is the only
-- writer, so no other takes the same callbacks.
UPDATE callbacks SET attempts = attempts + 1, lease = :lease, due_at = :now + :lease_s
WHERE job_id IN (SELECT job_id FROM callbacks
                 WHERE status = 'pending' AND due_at IS NOT NULL AND due_at <= :now
                 ORDER BY due_at
                 LIMIT :limit)
RETURNING job_id, url, attempts, ended_at;

-- name: move
-- The one transition of a running job, by a reported outcome (as core.jobs._reported makes it): only
-- while the job still runs that attempt under that lease (the ownership guard). A
-- cancellation requested while the attempt ran wins over a retry or a dead letter; a
-- refunded attempt (released: it never began) gives its budget back.
UPDATE jobs SET
    status = CASE WHEN cancel_requested_at IS NOT NULL AND :status <> 'succeeded'
                  THEN 'cancelled' ELSE :status END,
    result = CASE WHEN :status = 'succeeded' THEN :result ELSE result END,
    last_error = COALESCE(:last_error, last_error),
    dead_reason = CASE WHEN cancel_requested_at IS NOT NULL AND :status <> 'succeeded'
                       THEN NULL ELSE :dead_reason END,
    run_at = CASE WHEN :delay_s IS NULL THEN run_at ELSE COALESCE(:finished_at, :now) + :delay_s END,
    finished_at = CASE WHEN cancel_requested_at IS NOT NULL
                            OR :status IN ('succeeded', 'dead', 'cancelled')
                       THEN COALESCE(:finished_at, :now) END,
    attempt_base = attempt_base + :refund,
    lease_owner = NULL, heartbeat_at = NULL
WHERE id = :id AND status = 'running' AND attempt = :attempt AND lease_owner = :lease_owner
RETURNING id, status, dead_reason, run_at, finished_at;

-- name: end_attempt
-- The attempt of a job that `move` moved, ended as reported.
UPDATE attempts SET status = :attempt_status,
    started_at = COALESCE(:started_at, started_at), finished_at = COALESCE(:finished_at, :now),
    error_type = :error_type, error_message = :error_message, traceback = :traceback
WHERE job_id = :id AND number = :attempt AND status = 'running'
RETURNING finished_at - started_at AS duration_s;

-- name: fence
-- A worker's outcome that `move` refused: its attempt is marked fenced (unless the
-- outcome is already recorded, from an earlier report of the same worker).
UPDATE attempts SET fenced = 1
WHERE job_id = :id AND number = :attempt AND status <> :attempt_status
RETURNING job_id AS id;

-- name: due
-- Up to :limit due jobs under no limit (not held, not in a paused or limited queue), of
-- every queue when :queues is null, else of the queues in that JSON array, in the order a
-- claim takes them (jobs_claim's); claim_ids starts them. claim_limited takes held jobs.
SELECT id FROM jobs
WHERE status IN ('available', 'scheduled', 'retryable') AND NOT held AND run_at <= :now
  AND (:queues IS NULL OR queue IN (SELECT value FROM json_each(:queues)))
  AND queue NOT IN (SELECT name FROM queues
                    WHERE paused OR concurrency IS NOT NULL OR rate_count IS NOT NULL)
ORDER BY priority, run_at, id
LIMIT :limit;

-- name: due_in_queue
-- `due` for a worker of one queue, :queue, through jobs_claim_by_queue (SQLite cannot tell
-- how many queues a JSON array holds, so `due` would walk every queue's waiting jobs).
SELECT id FROM jobs
WHERE queue = :queue AND status IN ('available', 'scheduled', 'retryable') AND NOT held
  AND run_at <= :now AND :queue NOT IN (
      SELECT name FROM queues WHERE paused OR concurrency IS NOT NULL OR rate_count IS NOT NULL)
ORDER BY priority, run_at, id
LIMIT :limit;

-- name: held_queues
-- The queues whose jobs no plain claim takes: paused, or under a concurrency or a rate.
SELECT name FROM queues WHERE paused OR concurrency IS NOT NULL OR rate_count IS NOT NULL;

-- name: next_lane
-- Fair share (SPEC §11): the waiting jobs fall into lanes, one per (queue, priority, API
-- key). The lane after (:queue, :priority, :owner) among the queues in :queues (every
-- queue when null), through jobs_lanes: the next key at the same queue and priority, else
-- the next priority of the queue, else the next queue; each a seek, so a key's backlog is
-- never read through.
SELECT * FROM (
    SELECT queue, priority, COALESCE(api_key_id, 0) AS owner FROM jobs
    WHERE status IN ('available', 'scheduled', 'retryable') AND NOT held AND queue = :queue
      AND priority = :priority AND COALESCE(api_key_id, 0) > :owner
    ORDER BY COALESCE(api_key_id, 0) LIMIT 1)
UNION ALL
SELECT * FROM (
    SELECT queue, priority, COALESCE(api_key_id, 0) AS owner FROM jobs
    WHERE status IN ('available', 'scheduled', 'retryable') AND NOT held AND queue = :queue
      AND priority > :priority
    ORDER BY priority, COALESCE(api_key_id, 0) LIMIT 1)
UNION ALL
SELECT * FROM (
    SELECT queue, priority, COALESCE(api_key_id, 0) AS owner FROM jobs
    WHERE status IN ('available', 'scheduled', 'retryable') AND NOT held AND queue > :queue
      AND (:queues IS NULL OR queue IN (SELECT value FROM json_each(:queues)))
    ORDER BY queue, priority, COALESCE(api_key_id, 0) LIMIT 1)
LIMIT 1;

-- name: lane_jobs
-- The oldest :limit due jobs of one lane, and how many jobs of its key run in its queue.
SELECT id, run_at, (SELECT count(*) FROM jobs AS r
                    WHERE r.status = 'running' AND r.queue = :queue
                      AND COALESCE(r.api_key_id, 0) = :owner) AS running
FROM jobs
WHERE status IN ('available', 'scheduled', 'retryable') AND NOT held AND queue = :queue
  AND priority = :priority AND COALESCE(api_key_id, 0) = :owner AND run_at <= :now
ORDER BY run_at, id
LIMIT :limit;

-- name: claim_ids
-- Start the jobs (a JSON array of ids) a claim chose (`due`, `due_in_queue`, or
-- claim_limited), for :worker_id, those still waiting.
UPDATE jobs SET status = 'running', attempt = attempt + 1, lease_owner = :worker_id,
                heartbeat_at = :now, started_at = :now
WHERE id IN (SELECT value FROM json_each(:ids))
  AND status IN ('available', 'scheduled', 'retryable')
  AND (expires_at IS NULL OR expires_at > :now)
RETURNING id, type, queue, payload, priority, run_at, max_attempts, timeout_s,
          backoff_base_s, backoff_max_s, attempt, attempt_base, idempotency_key, started_at,
          cancel_requested_at, lease_owner, group_key, api_key_id;

-- name: start_attempts
-- The attempt rows of the jobs a claim started, given as a JSON array of [job_id, number].
INSERT INTO attempts (job_id, number, status, worker_id, host, pid, started_at)
SELECT value ->> 0, value ->> 1, 'running', :worker_id, :host, :pid, :now
FROM json_each(:claimed);

-- name: any_due
-- Whether `claim` would find a job: asked first, so that an idle worker's poll does not
-- take the single write lock.
SELECT EXISTS (
    SELECT 1 FROM jobs
    WHERE status IN ('available', 'scheduled', 'retryable') AND run_at <= :now
      AND (:queues IS NULL OR queue IN (SELECT value FROM json_each(:queues)))
      AND NOT held AND queue NOT IN (SELECT name FROM queues
                                     WHERE paused OR concurrency IS NOT NULL OR rate_count IS NOT NULL)) AS due;

-- name: any_due_in_queue
-- `any_due` for a worker of one queue, :queue (as claim_from_queue, through
-- jobs_claim_by_queue).
SELECT EXISTS (
    SELECT 1 FROM jobs
    WHERE status IN ('available', 'scheduled', 'retryable') AND run_at <= :now
      AND queue = :queue
      AND NOT held AND queue NOT IN (SELECT name FROM queues
                                     WHERE paused OR concurrency IS NOT NULL OR rate_count IS NOT NULL)) AS due;

-- name: any_held_due
-- Whether any job under limits (held) is due, through jobs_held.
SELECT EXISTS (SELECT 1 FROM jobs
               WHERE status IN ('available', 'scheduled', 'retryable') AND held
                 AND run_at <= :now) AS due;

-- name: limited_candidates
-- The due jobs a claim under limits looks at, in the order they are taken: the held ones
-- (of a type with limits, or of a queue with a concurrency or a rate; not paused), with
-- the queue's settings; a page of 100 from :offset.
SELECT j.id, j.type, j.queue, j.group_key, q.concurrency AS queue_concurrency,
       q.rate_count AS queue_rate_count, q.rate_period_s AS queue_rate_period_s
FROM jobs AS j LEFT JOIN queues AS q ON q.name = j.queue
WHERE j.status IN ('available', 'scheduled', 'retryable') AND j.held AND j.run_at <= :now
  AND (:queues IS NULL OR j.queue IN (SELECT value FROM json_each(:queues)))
  AND NOT COALESCE(q.paused, 0)
ORDER BY j.priority, j.run_at, j.id
LIMIT 100 OFFSET :offset;

-- name: alike
-- The first :limit due jobs that share a candidate's limits (its type, queue and group),
-- which one claim takes under the same places, through jobs_held_alike.
SELECT id FROM jobs
WHERE status IN ('available', 'scheduled', 'retryable') AND held AND run_at <= :now
  AND type = :type AND queue = :queue AND COALESCE(group_key, '') = COALESCE(:group_key, '')
ORDER BY priority, run_at, id
LIMIT :limit;

-- name: running_of_type
-- The claims running under a limit: a claim (a worker, a claim time) may hold several
-- jobs, which its worker runs one after another.
SELECT count(DISTINCT lease_owner || ' ' || started_at) AS running FROM jobs
WHERE status = 'running' AND type = :type;

-- name: running_of_group
SELECT count(DISTINCT lease_owner || ' ' || started_at) AS running FROM jobs
WHERE status = 'running' AND type = :type AND group_key = :group_key;

-- name: running_of_queue
SELECT count(DISTINCT lease_owner || ' ' || started_at) AS running FROM jobs
WHERE status = 'running' AND queue = :queue;

-- name: starts_since
-- Attempts started under a rate limit (:key) after :since.
SELECT count(*) AS started FROM flow_starts WHERE key = :key AND started_at > :since;

-- name: forget_starts
DELETE FROM flow_starts WHERE key = :key AND started_at <= :since;

-- name: record_starts
-- :count starts under a rate limit (:key) at :now.
WITH RECURSIVE n (i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :count)
INSERT INTO flow_starts (key, started_at) SELECT :key, :now FROM n;

-- name: stale_claim
-- The running jobs of one worker whose heartbeat is older than :lease_s (the reaper's
-- transaction holds the write lock, so nobody changes them before it commits).
SELECT * FROM jobs
WHERE lease_owner = :owner AND status = 'running' AND heartbeat_at < :now - :lease_s;

-- name: job_counts
-- How many jobs each queue (:queue alone when given) has in each status, counted in the
-- table itself (the embedded default keeps no counts: see postgres.sql).
SELECT queue, status, count(*) AS count FROM jobs
WHERE :queue IS NULL OR queue = :queue
GROUP BY queue, status;
