"""procrastinate on its own PostgreSQL database: psycopg connector, `procrastinate worker`
processes (default concurrency 1, LISTEN/NOTIFY on), an async no-op task."""
import asyncio
import os
import signal
import sys
import time

from bench import common

_app = None


def _make_app():
    from procrastinate import App, PsycopgConnector
    application = App(connector=PsycopgConnector(conninfo=os.environ["BENCH_PEER_DSN"]))

    @application.task(name="noop")
    async def noop(n=0):
        common.stamp(n)

    return application


if os.environ.get("BENCH_PEER_DSN"):
    app = _make_app()  # `procrastinate --app=bench.peerprogs.procrastinate_peer.app worker`


class Peer:
    name = "procrastinate"
    stop_signal = signal.SIGTERM

    def __init__(self, args):
        from importlib.metadata import version
        self.args = args
        self.version = version("procrastinate")
        os.environ["BENCH_PEER_DSN"] = args.dsn
        from bench.peerprogs import procrastinate_peer  # the app lives in that module, not __main__
        self.app = procrastinate_peer.app
        self.task = self.app.tasks["noop"]
        self.loop = asyncio.new_event_loop()

    def env(self, args):
        return {"BENCH_PEER_DSN": args.dsn}

    def setup(self):
        self.loop.run_until_complete(self.app.open_async())
        self.loop.run_until_complete(self.app.schema_manager.apply_schema_async())
        self.check = common.pg_connect(self.args.dsn)

    def bulk_enqueue(self, count, first=1):
        t0 = time.perf_counter()
        done = 0
        while done < count:
            size = min(1000, count - done)
            self.loop.run_until_complete(self.task.batch_defer_async(
                *[{"n": first + done + i} for i in range(size)]))
            done += size
        return time.perf_counter() - t0

    def submit(self, n):
        self.loop.run_until_complete(self.task.defer_async(n=n))

    def worker_commands(self, count):
        return [[sys.executable, "-m", "procrastinate", "--log-level", "warning",
                 "--app=bench.peerprogs.procrastinate_peer.app", "worker"] for _ in range(count)]

    def pending(self):
        with self.check.cursor() as cur:
            cur.execute("SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')")
            return cur.fetchone()[0]

    def analyze(self):
        with self.check.cursor() as cur:
            cur.execute("ANALYZE")

    def teardown(self):
        if hasattr(self, "check"):
            self.loop.run_until_complete(self.app.close_async())
            self.check.close()


if __name__ == "__main__":
    from bench.peerprogs import main
    main(Peer)
