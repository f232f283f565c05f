"""Fewer index entries per job run (issue 17: the drain).

A claim moves a job to `running` in a new row version, and every index whose predicate the
new version meets gets an entry: `jobs_status` did (it left out only `succeeded`), though a
list of running jobs is short and `jobs_running` finds them; now it leaves `running` out
too. On PostgreSQL `jobs_running_type` served no statement (its claims count places in
`flow_slots`), so it goes there; SQLite counts running claims through it.
"""
import peewee as pw


def up(migrator, db):
    db.execute_sql("DROP INDEX jobs_status")
    db.execute_sql("CREATE INDEX jobs_status ON jobs (status, id) "
                   "WHERE status NOT IN ('succeeded', 'running')")
    if isinstance(db, pw.PostgresqlDatabase):
        db.execute_sql("DROP INDEX jobs_running_type")
