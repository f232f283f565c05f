"""API keys: a name, a role, an optional rate limit, and the key's SHA-256, never the key.

The unique hash is how a presented key is found; the partial unique index keeps one
active key per name while revoked keys stay for the record (a name can be reused
after its key is revoked).
"""
import peewee as pw


def up(migrator, db):
    postgres = isinstance(db, pw.PostgresqlDatabase)
    serial = "BIGSERIAL PRIMARY KEY" if postgres else "INTEGER PRIMARY KEY AUTOINCREMENT"
    statements = [
        f"""CREATE TABLE api_keys (
            id {serial},
            name TEXT NOT NULL,
            key_hash TEXT NOT NULL UNIQUE,
            role TEXT NOT NULL CHECK (role IN ('submit', 'admin')),
            rate_limit TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            revoked_at DOUBLE PRECISION
        )""",
        "CREATE UNIQUE INDEX api_keys_active_name ON api_keys (name) WHERE revoked_at IS NULL",
    ]
    for statement in statements:
        db.execute_sql(statement)
