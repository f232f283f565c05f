"""Celery on Redis: `celery worker -P prefork -c N` (one worker, N forked processes, the
documented setup), results ignored, a no-op task; the queue is this run's own."""
import os
import signal
import sys
import time

from bench import common


def _make_app():
    from celery import Celery
    application = Celery("bench", broker=os.environ["BENCH_PEER_REDIS"])
    application.conf.update(task_ignore_result=True, task_default_queue=os.environ["BENCH_PEER_QUEUE"],
                            broker_connection_retry_on_startup=True, worker_hijack_root_logger=True)

    @application.task(name="noop")
    def noop(n=0):
        common.stamp(n)

    return application


if os.environ.get("BENCH_PEER_REDIS"):
    app = _make_app()  # `celery -A bench.peerprogs.celery_peer worker`


class Peer:
    name = "celery"
    stop_signal = signal.SIGTERM

    def __init__(self, args):
        import celery
        self.args = args
        self.version = celery.__version__
        self.queue = f"bench-{os.getpid()}"
        os.environ["BENCH_PEER_REDIS"] = args.redis
        os.environ["BENCH_PEER_QUEUE"] = self.queue
        from bench.peerprogs import celery_peer  # the app lives in that module, not __main__
        self.app = celery_peer.app
        self.task = self.app.tasks["noop"]

    def env(self, args):
        return {"BENCH_PEER_REDIS": args.redis, "BENCH_PEER_QUEUE": self.queue}

    def setup(self):
        from redis import Redis
        self.redis = Redis.from_url(self.args.redis)
        self.producer_pool = self.app.producer_pool
        self.submit(0)  # connect the producer and declare the queue (not timed)
        self.redis.delete(self.queue)

    def bulk_enqueue(self, count, first=1):
        t0 = time.perf_counter()
        with self.app.producer_or_acquire() as producer:
            for i in range(count):
                self.task.apply_async(kwargs={"n": first + i}, producer=producer)
        return time.perf_counter() - t0

    def submit(self, n):
        self.task.apply_async(kwargs={"n": n})

    def worker_commands(self, count):
        return [[sys.executable, "-m", "celery", "-A", "bench.peerprogs.celery_peer", "worker",
                 "-P", "prefork", "-c", str(count), "-Q", self.queue, "-n",
                 f"{self.queue}@%h", "--loglevel", "WARNING"]]

    def pending(self):
        return self.redis.llen(self.queue) + self.redis.hlen("unacked")

    def analyze(self):
        pass

    def teardown(self):
        pass


if __name__ == "__main__":
    from bench.peerprogs import main
    main(Peer)
