"""pgqueuer on its own PostgreSQL database: asyncpg driver, `pgq run` workers with
--batch-size 10 (its default and its documented setting), an async no-op entrypoint."""
import asyncio
import os
import signal
import sys
from contextlib import asynccontextmanager

from bench import common

ENTRYPOINT = "noop"


@asynccontextmanager
async def factory():
    """The worker's factory (`python -m pgqueuer run bench.peerprogs.pgqueuer_peer:factory`)."""
    import asyncpg
    from pgqueuer import PgQueuer
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job

    connection = await asyncpg.connect(os.environ["BENCH_PEER_DSN"])
    pgq = PgQueuer(AsyncpgDriver(connection))

    # BENCH_CONCURRENCY_LIMIT: pgqueuer's own concurrency_limit (0, its default: none).
    @pgq.entrypoint(ENTRYPOINT,
                    concurrency_limit=int(os.environ.get("BENCH_CONCURRENCY_LIMIT", "0")))
    async def noop(job: Job) -> None:
        common.stamp(int(job.payload or b"0"))

    try:
        yield pgq
    finally:
        await connection.close()


class Peer:
    name = "pgqueuer"
    stop_signal = signal.SIGTERM

    def __init__(self, args):
        import pgqueuer
        self.args = args
        self.version = pgqueuer.__version__
        self.loop = asyncio.new_event_loop()

    def env(self, args):
        return {"BENCH_PEER_DSN": args.dsn, "PGDSN": args.dsn}

    def setup(self):
        import asyncpg
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.queries import Queries
        self.conn = self.loop.run_until_complete(asyncpg.connect(self.args.dsn))
        self.queries = Queries(AsyncpgDriver(self.conn))
        if not self.loop.run_until_complete(self.queries.schema_is_installed()):
            self.loop.run_until_complete(self.queries.install())
        self.check = common.pg_connect(self.args.dsn)

    def bulk_enqueue(self, count, first=1):
        import time
        t0 = time.perf_counter()
        done = 0
        while done < count:
            size = min(1000, count - done)
            self.loop.run_until_complete(self.queries.enqueue(
                [ENTRYPOINT] * size, [str(first + done + i).encode() for i in range(size)],
                [0] * size))
            done += size
        return time.perf_counter() - t0

    def submit(self, n):
        self.loop.run_until_complete(self.queries.enqueue(ENTRYPOINT, str(n).encode()))

    def worker_commands(self, count):
        # `pgq run ... --batch-size 10` as documented; pgqueuer 1.6.0's CLI fails here on its
        # --log-level option with this typer ("'str' object has no attribute 'name'"), so
        # the worker runs through pgqueuer.run(), the same supervisor without the CLI.
        return [[sys.executable, "-m", "bench.peerprogs.pgqueuer_peer", "worker"]
                for _ in range(count)]

    def pending(self):
        with self.check.cursor() as cur:
            cur.execute("SELECT count(*) FROM pgqueuer")
            return cur.fetchone()[0]

    def analyze(self):
        with self.check.cursor() as cur:
            cur.execute("ANALYZE")

    def teardown(self):
        if hasattr(self, "conn"):
            self.loop.run_until_complete(self.conn.close())
            self.check.close()


def worker():
    import logging
    import pgqueuer
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pgqueuer").setLevel(logging.WARNING)
    asyncio.run(pgqueuer.run(factory, batch_size=10))


if __name__ == "__main__":
    if sys.argv[1:] == ["worker"]:
        worker()
    else:
        from bench.peerprogs import main
        main(Peer)
