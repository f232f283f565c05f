"""Jobs, their attempts and steps, and the live worker registry.

Written as SQL rather than generated from the models: the partial indexes and unique
constraints here are the guarantees (one row per job+attempt, one idempotency key per
API key) and the small indexes workers poll, and they should read as such.
"""
import peewee as pw


def up(migrator, db):
    postgres = isinstance(db, pw.PostgresqlDatabase)
    serial = "BIGSERIAL PRIMARY KEY" if postgres else "INTEGER PRIMARY KEY AUTOINCREMENT"
    # Room on each page, so an attempt's one update (its end) can stay on its page (HOT).
    fill = " WITH (fillfactor = 80)" if postgres else ""
    statements = [
        f"""CREATE TABLE jobs (
            id {serial},
            type TEXT NOT NULL,
            queue TEXT NOT NULL,
            payload TEXT NOT NULL,
            priority INTEGER NOT NULL DEFAULT 0,
            run_at DOUBLE PRECISION NOT NULL,
            max_attempts INTEGER NOT NULL CHECK (max_attempts >= 1),
            timeout_s DOUBLE PRECISION NOT NULL CHECK (timeout_s > 0),
            backoff_base_s DOUBLE PRECISION NOT NULL,
            backoff_max_s DOUBLE PRECISION NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('scheduled', 'available', 'running',
                'succeeded', 'retryable', 'dead', 'cancelled')),
            attempt INTEGER NOT NULL DEFAULT 0,
            attempt_base INTEGER NOT NULL DEFAULT 0,
            idempotency_key TEXT,
            request_hash TEXT,
            api_key_id BIGINT,
            result TEXT,
            last_error TEXT,
            dead_reason TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            started_at DOUBLE PRECISION,
            finished_at DOUBLE PRECISION,
            lease_owner TEXT,
            heartbeat_at DOUBLE PRECISION,
            cancel_requested_at DOUBLE PRECISION,
            CHECK ((status = 'running') = (lease_owner IS NOT NULL))
        )""",
        # What workers poll: only jobs waiting to run, so finished history never slows a claim.
        """CREATE INDEX jobs_claim ON jobs (priority, run_at, id)
            WHERE status IN ('available', 'scheduled', 'retryable')""",
        """CREATE INDEX jobs_claim_by_queue ON jobs (queue, priority, run_at, id)
            WHERE status IN ('available', 'scheduled', 'retryable')""",
        """CREATE INDEX jobs_due ON jobs (run_at)
            WHERE status IN ('scheduled', 'retryable')""",
        # Few and mostly partial: a job is rewritten three times or more, and every
        # rewrite adds an entry to each index whose condition the new row meets. Listing
        # succeeded jobs walks the primary key; filtering by type or queue scans.
        "CREATE INDEX jobs_running ON jobs (heartbeat_at) WHERE status = 'running'",
        "CREATE INDEX jobs_status ON jobs (status, id) WHERE status <> 'succeeded'",
        "CREATE INDEX jobs_api_key ON jobs (api_key_id, id) WHERE api_key_id IS NOT NULL",
        """CREATE INDEX jobs_finished ON jobs (finished_at)
            WHERE status IN ('succeeded', 'cancelled')""",
        # One job per (API key, Idempotency-Key); jobs submitted without a key share key 0.
        """CREATE UNIQUE INDEX jobs_idempotency ON jobs (COALESCE(api_key_id, 0), idempotency_key)
            WHERE idempotency_key IS NOT NULL""",
        f"""CREATE TABLE attempts (
            id {serial},
            job_id BIGINT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            number INTEGER NOT NULL CHECK (number >= 1),
            status TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'failed',
                'timed_out', 'crashed', 'interrupted', 'cancelled')),
            worker_id TEXT NOT NULL,
            host TEXT,
            pid INTEGER,
            started_at DOUBLE PRECISION NOT NULL,
            finished_at DOUBLE PRECISION,
            error_type TEXT,
            error_message TEXT,
            traceback TEXT,
            fenced BOOLEAN NOT NULL DEFAULT FALSE,
            UNIQUE (job_id, number)
        ){fill}""",
        """CREATE TABLE steps (
            job_id BIGINT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            result TEXT,
            attempt INTEGER NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (job_id, name)
        )""",
        """CREATE TABLE workers (
            id TEXT PRIMARY KEY,
            supervisor_id TEXT NOT NULL,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            queues TEXT NOT NULL,
            started_at DOUBLE PRECISION NOT NULL,
            last_heartbeat_at DOUBLE PRECISION NOT NULL
        )""",
    ]
    for statement in statements:
        db.execute_sql(statement)
