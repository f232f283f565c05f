"""Fair share (SPEC §11): the waiting jobs by lane, (queue, priority, API key), each lane's
oldest first, for the claim that takes the lanes by turns (core/store/*.sql `turns`,
`next_lane`). Jobs without a key share lane 0."""


def up(migrator, db):
    db.execute_sql("""CREATE INDEX jobs_lanes ON jobs (queue, priority, (COALESCE(api_key_id, 0)),
                                                      run_at, id)
        WHERE status IN ('available', 'scheduled', 'retryable') AND NOT held""")
