"""Prometheus metrics for GET /metrics, computed from the database at each scrape.

Nothing is counted in process memory, so every web process (and every gunicorn worker)
reports the same numbers.
"""
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

import jobs

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class JobsCollector:
    """Jobs by queue and status, the age of the oldest due job, live workers."""

    def __init__(self, lease_s):
        self.lease_s = lease_s

    def collect(self):
        stats = jobs.stats(self.lease_s)
        by_queue = GaugeMetricFamily("conveyor_jobs", "Jobs by queue and status.",
                                     labels=["queue", "status"])
        for queue, counts in sorted(stats["queues"].items()):
            for status in jobs.STATUSES:
                by_queue.add_metric([queue, status], counts.get(status, 0))
        yield by_queue
        yield GaugeMetricFamily(
            "conveyor_oldest_available_job_age_seconds",
            "How long the oldest due job has waited to be claimed.",
            value=stats["oldest_available_age_s"])
        yield GaugeMetricFamily(
            "conveyor_workers_alive", "Worker processes with a heartbeat within the lease.",
            value=stats["workers_alive"])


def registry(lease_s):
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(JobsCollector(lease_s))
    return collectors


def exposition(collectors):
    """The metrics in the Prometheus text format."""
    return generate_latest(collectors)
