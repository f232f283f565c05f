"""RQ on Redis: N `rq worker -w rq.worker.SimpleWorker` processes (the forking Worker makes
a process per job: about 90 jobs/s here), a no-op function; the queue is this run's own."""
import os
import signal
import sys
import time

from bench import common


def noop(n=0):
    common.stamp(n)


class Peer:
    name = "rq"
    stop_signal = signal.SIGTERM

    def __init__(self, args):
        import rq
        self.args = args
        self.version = rq.__version__ if hasattr(rq, "__version__") else rq.VERSION
        self.queue_name = f"bench-{os.getpid()}"

    def env(self, args):
        return {}

    def setup(self):
        from redis import Redis
        from rq import Queue
        self.redis = Redis.from_url(self.args.redis)
        self.queue = Queue(self.queue_name, connection=self.redis)

    def bulk_enqueue(self, count, first=1):
        from rq import Queue

        from bench.peerprogs.rq_peer import noop  # by its importable name, not __main__'s
        t0 = time.perf_counter()
        done = 0
        while done < count:
            size = min(1000, count - done)
            with self.redis.pipeline() as pipe:
                self.queue.enqueue_many([Queue.prepare_data(noop, kwargs={"n": first + done + i})
                                         for i in range(size)], pipeline=pipe)
                pipe.execute()
            done += size
        return time.perf_counter() - t0

    def submit(self, n):
        self.queue.enqueue("bench.peerprogs.rq_peer.noop", n=n)

    def worker_commands(self, count):
        return [[sys.executable, "-m", "rq.cli", "worker", "-w", "rq.worker.SimpleWorker",
                 "--url", self.args.redis, "--logging_level", "WARNING", self.queue_name]
                for _ in range(count)]

    def pending(self):
        return self.queue.count + self.queue.started_job_registry.count

    def analyze(self):
        pass

    def teardown(self):
        pass


if __name__ == "__main__":
    from bench.peerprogs import main
    main(Peer)
