-- The PostgreSQL statements of the core, each whole under its name (core/store/queries.py
-- loads them; core/store/postgres.py runs them). Parameters are named, %(name)s.
--
-- One instant per statement: `clock`, read from clock_timestamp() once the statement runs,
-- not now() (its transaction's start). A claim may wait (a lock, the scheduler) between the
-- two and see a release that committed meanwhile; the attempt it starts must begin after
-- the released one was recorded finished.
--
-- The status words are literals (core/status.py names them; tests/test_store.py checks the
-- two agree): a partial index serves a query only when the query spells out its predicate.

-- name: clock
-- The database's clock, in epoch seconds.
SELECT extract(epoch from clock_timestamp())::float8 AS now;

-- name: take_callbacks
-- Up to %(limit)s due callbacks (their job ended, migrations/0011_callbacks.py), the earliest
-- first, taken under %(lease)s: due_at moves %(lease_s)s ahead, so that one taken by a
-- supervisor killed while it delivers is due again once that lease is over, and the
-- attempt is counted before the POST. SKIP LOCKED: two supervisors never take the same one.
WITH clock AS MATERIALIZED (SELECT extract(epoch from clock_timestamp())::float8 AS now),
due AS (
    SELECT job_id FROM callbacks
    WHERE status = 'pending' AND due_at IS NOT NULL AND due_at <= (SELECT now FROM clock)
    ORDER BY due_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED)
UPDATE callbacks SET attempts = callbacks.attempts + 1, lease = %(lease)s,
                     due_at = clock.now + %(lease_s)s
FROM due, clock
WHERE callbacks.job_id = due.job_id
RETURNING callbacks.job_id, callbacks.url, callbacks.attempts, callbacks.ended_at;

-- name: insert_jobs
-- Store jobs given as one JSON array of arrays (PostgreSQL reads arrays much faster than
-- objects), in the order of core.store.postgres.insert_jobs, read as jsonb: parsed once,
-- where json would parse each job's array again for every field taken from it. A key this
-- API key used already is skipped (the unique index jobs_idempotency decides), and so is
-- a unique key (SPEC §12) that a job of the same type holds (jobs_unique): the caller
-- reads the job they name. A job expires ttl_s after this statement's clock, or at
-- expires_at. A job of a type in %(limited_types)s or of a paused or limited queue is
-- stored held. When %(announce)s, what can run now is announced here, at this commit (one
-- NOTIFY per queue, with its count): the fastest way to a waiting worker, but it holds
-- PostgreSQL's one lock on notifying commits through this commit's WAL flush, so the
-- jobs are announced after the commit instead (notify, by the process's announcer) when
-- other submissions are under way (core.jobs.enqueue).
WITH clock AS MATERIALIZED (SELECT extract(epoch from clock_timestamp())::float8 AS now),
given AS (
    SELECT (job->>0)::text AS type, (job->>1)::text AS queue, (job->>2)::int AS priority,
           (job->>3)::float8 AS run_at, (job->>4)::float8 AS delay_s,
           (job->>5)::int AS max_attempts, (job->>6)::float8 AS timeout_s,
           (job->>7)::float8 AS backoff_base_s, (job->>8)::float8 AS backoff_max_s,
           (job->>9)::text AS idempotency_key, (job->>10)::text AS request_hash,
           (job->>11)::text AS group_key, job->12 AS options, (job->>13)::text AS payload
    FROM jsonb_array_elements(%(jobs)s::jsonb) AS job
    OFFSET 0),  -- each row's fields read once (not once per use of the options)
new AS (
    INSERT INTO jobs (type, queue, payload, priority, run_at, status, max_attempts,
                      timeout_s, backoff_base_s, backoff_max_s, idempotency_key,
                      request_hash, group_key, held, api_key_id, created_at, unique_key,
                      unique_while, unique_hold, expires_at, parent_id)
    SELECT v.type, v.queue, v.payload, v.priority, COALESCE(v.run_at, clock.now + v.delay_s),
           CASE WHEN COALESCE(v.run_at, clock.now + v.delay_s) > clock.now
                THEN 'scheduled' ELSE 'available' END,
           v.max_attempts, v.timeout_s, v.backoff_base_s, v.backoff_max_s,
           v.idempotency_key, v.request_hash, v.group_key,
           v.type = ANY(%(limited_types)s::text[]) OR v.queue IN (
               SELECT name FROM queues
               WHERE paused OR concurrency IS NOT NULL OR rate_count IS NOT NULL),
           %(api_key_id)s::bigint, clock.now, v.options->>0, v.options->>1, v.options->>0,
           COALESCE((v.options->>3)::float8, clock.now + (v.options->>2)::float8),
           (v.options->>4)::bigint
    FROM given AS v, clock
    ON CONFLICT DO NOTHING
    RETURNING id, idempotency_key, status, run_at, created_at, held, type, unique_hold,
              expires_at, queue),
announced AS (
    SELECT count(pg_notify(%(channel)s, runnable.queue || ':' || runnable.count)) AS queues
    FROM (SELECT queue, count(*) AS count FROM new
          WHERE %(announce)s AND status = 'available' AND NOT held
          GROUP BY queue) AS runnable)
SELECT id, idempotency_key, status, run_at, created_at, held, type, unique_hold, expires_at
FROM new, announced
ORDER BY id;

-- name: step
-- A worker's round trip: claim up to %(limit)s due jobs of %(queues)s (every queue when
-- null) for %(worker_id)s, and record the outcomes in %(reports)s (a JSON array of
-- objects, as core.jobs._reported makes them); when %(limits)s is given (the types'
-- limits, SPEC §11) and fewer than %(limit)s were found, claim the rest under limits.
-- %(turns)s: fair share's choice of ids. One function, conveyor_step
-- (migrations/0014_generic_claim_plans.py says how), whose plans are kept for the session:
-- a worker's session plans every other statement afresh (models.open_database).
--
-- Answers one row per claimed job, moved job, refused report and job claimed under limits:
-- (kind, row as JSON).
SELECT kind, "row"
FROM conveyor_step(%(reports)s::json, %(worker_id)s, %(host)s, %(pid)s, %(queues)s::text[],
                   %(turns)s::bigint[], %(limit)s::int, %(limits)s::jsonb, %(guard)s::float8);

-- name: turns
-- Fair share (SPEC §11): the waiting jobs fall into lanes, one per (queue, priority, API
-- key), found by a recursive skip through jobs_lanes (one probe a lane, so a key's backlog
-- is never read through). This answers the ids (and lanes) of up to %(limit)s x 4 due
-- jobs under no limit of the queues in %(queues)s (every queue when null), every lane's
-- oldest first,
-- then every lane's second..., lower priority first, and within a turn the lanes whose key
-- has the fewest jobs running first. Read without locks; `step` then claims %(limit)s of
-- them (those still waiting, passing over those another worker holds) in this order.
WITH RECURSIVE clock AS MATERIALIZED (SELECT extract(epoch from clock_timestamp())::float8 AS now),
lanes (queue, priority, owner) AS (
    (SELECT queue, priority, COALESCE(api_key_id, 0) FROM jobs
     WHERE status IN ('available', 'scheduled', 'retryable') AND NOT held
       AND (%(queues)s::text[] IS NULL OR queue = ANY(%(queues)s::text[]))
     ORDER BY queue, priority, COALESCE(api_key_id, 0)
     LIMIT 1)
    UNION ALL
    SELECT later.* FROM lanes AS l CROSS JOIN LATERAL (
        SELECT queue, priority, COALESCE(api_key_id, 0) FROM jobs
        WHERE status IN ('available', 'scheduled', 'retryable') AND NOT held
          AND (%(queues)s::text[] IS NULL OR queue = ANY(%(queues)s::text[]))
          AND (queue, priority, COALESCE(api_key_id, 0)) > (l.queue, l.priority, l.owner)
        ORDER BY queue, priority, COALESCE(api_key_id, 0)
        LIMIT 1) AS later),
running AS (
    SELECT queue, COALESCE(api_key_id, 0) AS owner, count(*) AS jobs FROM jobs
    WHERE status = 'running' GROUP BY 1, 2)
SELECT j.id, l.queue, l.priority, l.owner FROM lanes AS l
LEFT JOIN running AS r ON r.queue = l.queue AND r.owner = l.owner
CROSS JOIN LATERAL (
    SELECT id, run_at, row_number() OVER (ORDER BY run_at, id) AS turn FROM (
        SELECT id, run_at FROM jobs
        WHERE status IN ('available', 'scheduled', 'retryable') AND NOT held
          AND queue = l.queue AND priority = l.priority AND COALESCE(api_key_id, 0) = l.owner
          AND run_at <= (SELECT now FROM clock)
        ORDER BY run_at, id
        LIMIT %(limit)s) AS oldest) AS j
WHERE l.queue NOT IN (SELECT name FROM queues
                      WHERE paused OR concurrency IS NOT NULL OR rate_count IS NOT NULL)
ORDER BY l.priority, j.turn, COALESCE(r.jobs, 0), j.run_at, j.id
LIMIT %(limit)s * 4;

-- name: stale_claim
-- The running jobs of one worker whose heartbeat is older than %(lease_s)s, locked, with
-- how many there are: the caller takes the claim only when it locked all of them (another
-- session holding any, a reaper or a cut-off session until the server ends it, means a
-- later round decides from the whole claim instead of from part of it).
WITH stale AS (
    SELECT id FROM jobs
    WHERE lease_owner = %(owner)s AND status = 'running'
      AND heartbeat_at < extract(epoch from clock_timestamp())::float8 - %(lease_s)s),
locked AS (
    SELECT jobs.* FROM jobs JOIN stale USING (id)
    FOR UPDATE OF jobs SKIP LOCKED)
SELECT locked.*, (SELECT count(*) FROM stale) AS stale FROM locked;

-- name: notify
-- Wake the supervisors' idle workers: %(count)s jobs of %(queue)s can run now (inside the
-- caller's transaction: sent at its commit).
SELECT pg_notify(%(channel)s, %(queue)s::text || ':' || %(count)s::text);

-- name: announce
-- notify for every queue of %(queues)s (with its count of %(counts)s) in a transaction of
-- its own, whose commit does not wait for its WAL flush (set_config(..., true) holds for
-- this transaction alone). PostgreSQL serialises notifying commits on one lock, held
-- through the commit: one that waited for its flush made every other one wait for it.
SELECT set_config('synchronous_commit', 'off', true),
       pg_notify(%(channel)s, announced.queue || ':' || announced.count)
FROM unnest(%(queues)s::text[], %(counts)s::int[]) AS announced(queue, count);

-- name: job_counts
-- How many jobs each queue (%(queue)s alone when given) has in each status: the counts
-- the triggers of migrations/0018_job_counts.py keep, summed over their shards; a status
-- without jobs is left out.
SELECT queue, status, sum(count)::bigint AS count FROM job_counts
WHERE %(queue)s::text IS NULL OR queue = %(queue)s::text
GROUP BY queue, status HAVING sum(count) <> 0;

-- name: fold_counts
-- Fold the counts of sessions that ended into shard 0, and drop the rows that count
-- nothing: the table stays as small as the sessions and the queues and statuses in use.
-- (A session whose pid a new one took keeps adding to its rows: the sums stay right.)
WITH ended AS (
    DELETE FROM job_counts
    WHERE shard <> 0 AND shard NOT IN (SELECT pid FROM pg_stat_activity WHERE pid IS NOT NULL)
    RETURNING queue, status, count),
folded AS (
    INSERT INTO job_counts AS counted (queue, status, shard, count)
    SELECT queue, status, 0, sum(count) FROM ended
    GROUP BY queue, status ORDER BY queue, status
    ON CONFLICT (queue, status, shard) DO UPDATE SET count = counted.count + excluded.count
    RETURNING 1)
SELECT (SELECT count(*) FROM ended) AS ended, (SELECT count(*) FROM folded) AS folded;

-- name: drop_zero_counts
DELETE FROM job_counts WHERE shard = 0 AND count = 0;

-- name: miscounted
-- For `flask audit`: each queue and status whose kept count differs from the jobs stored,
-- both read in one snapshot.
WITH stored AS (SELECT queue, status, count(*) AS count FROM jobs GROUP BY queue, status),
counted AS (SELECT queue, status, sum(count) AS count FROM job_counts GROUP BY queue, status)
SELECT COALESCE(stored.queue, counted.queue) AS queue,
       COALESCE(stored.status, counted.status) AS status,
       COALESCE(stored.count, 0) AS stored, COALESCE(counted.count, 0)::bigint AS counted
FROM stored FULL JOIN counted
    ON counted.queue = stored.queue AND counted.status = stored.status
WHERE COALESCE(stored.count, 0) <> COALESCE(counted.count, 0);
