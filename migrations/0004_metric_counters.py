"""Prometheus counters, kept in the database so /metrics sums every process on every host.

Each process adds its increments to its own rows (no two processes update one row), and
the pruner folds the rows of long-gone processes into one "retired" row per series.
"""


def up(migrator, db):
    db.execute_sql("""CREATE TABLE metric_counters (
        process_id TEXT NOT NULL,
        name TEXT NOT NULL,
        labels TEXT NOT NULL,
        value DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (process_id, name, labels)
    )""")
