"""`python -m supervisor`: the process that forks, watches and restarts workers, reaps
stale attempts and fires schedules. See pool.py (the supervisor) and worker.py (a worker)."""
