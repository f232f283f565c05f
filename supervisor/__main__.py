"""`python -m supervisor [--concurrency N] [--queues a,b]`: run a pool of worker processes."""
import sys

import click

from infra import boot
from infra.config import ConfigError, fail_fast
from handlers import HandlerError
from supervisor.pool import Supervisor


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--concurrency", type=click.IntRange(min=1),
              help="Worker processes to run (default: WORKER_CONCURRENCY, else the CPU count).")
@click.option("--queues", help="Comma-separated queues to take jobs from (default: all).")
def main(concurrency, queues):
    """Run worker processes that take jobs from the database until SIGTERM."""
    try:
        settings = boot.start(upgrade=False, custom_plans=True)  # see models.open_database
        boot.ready("worker")  # a database not yet migrated stops it: see boot.ready
    except (ConfigError, HandlerError) as exc:
        fail_fast(exc)
    chosen = tuple(q.strip() for q in (queues or "").split(",") if q.strip())
    supervisor = Supervisor(settings, concurrency or settings.worker_concurrency,
                            chosen or settings.worker_queues)
    sys.exit(supervisor.run())


if __name__ == "__main__":
    main(prog_name="python -m supervisor")
