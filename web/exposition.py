"""GET /metrics: the Prometheus exposition, read from the database at each scrape.

Counters are what every process counted into the metrics sink (metrics.py), summed over
all of them; gauges (queue depth, oldest available job, live workers) are asked of the
core, and whether the rate-limit storage answers of the web process scraped. The core
never imports this module, so it imports the core like any other.
"""
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from core import history
from core import callbacks

from core import status as statuses
from infra import metrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class CountersCollector:
    """Every counter and the duration histogram, summed over all processes."""

    def collect(self):
        series = metrics.totals()
        for name, (help_text, label_names) in metrics.COUNTERS.items():
            family = CounterMetricFamily(name, help_text, labels=label_names)
            for labels, total in sorted(series.get(name, [])):
                family.add_metric(labels, total)
            yield family
        yield self._histogram(series)

    @staticmethod
    def _histogram(series):
        family = HistogramMetricFamily(metrics.DURATION,
                                       "How long attempts ran, by job type and queue.",
                                       labels=metrics.DURATION_LABELS)
        buckets = {}
        for labels, total in series.get(f"{metrics.DURATION}_bucket", []):
            buckets.setdefault(labels[:-1], {})[labels[-1]] = total
        sums = dict(series.get(f"{metrics.DURATION}_sum", []))
        for labels, counts in sorted(buckets.items()):
            ordered = [(bound, counts.get(bound, 0.0)) for bound in map(repr, metrics.BUCKETS)]
            family.add_metric(list(labels), ordered + [("+Inf", counts.get("+Inf", 0.0))],
                              sum_value=sums.get(labels, 0.0))
        return family


class JobsCollector:
    """Queue depth and oldest available job per queue, and live workers, read at scrape."""

    def __init__(self, lease_s):
        self.lease_s = lease_s

    def collect(self):
        stats = history.stats(self.lease_s)
        depth = GaugeMetricFamily("conveyor_jobs", "Jobs by queue and status.",
                                  labels=["queue", "status"])
        for queue, counts in sorted(stats["queues"].items()):
            for status in statuses.STATUSES:
                depth.add_metric([queue, status], counts.get(status, 0))
        yield depth
        oldest = GaugeMetricFamily(
            "conveyor_oldest_available_job_age_seconds",
            "How long the oldest due job of each queue has waited to be claimed.",
            labels=["queue"])
        ages = history.oldest_available_by_queue()
        for queue in sorted(stats["queues"]):
            oldest.add_metric([queue], ages.get(queue, 0.0))
        yield oldest
        yield GaugeMetricFamily(
            "conveyor_workers_alive", "Worker processes with a heartbeat within the lease.",
            value=stats["workers_alive"])


class CallbacksCollector:
    """Callbacks whose job ended and that wait for a 2xx (their counts delivered and failed
    are counters), read at scrape."""

    def collect(self):
        yield GaugeMetricFamily(
            "conveyor_callbacks_pending",
            "Job callbacks due or being retried: their job ended, no 2xx yet, not given up.",
            value=callbacks.pending_count())


class RateLimitStorageCollector:
    """Whether this web process reaches its rate-limit storage, asked at each scrape."""

    def __init__(self, reachable):
        self.reachable = reachable

    def collect(self):
        yield GaugeMetricFamily(
            "conveyor_rate_limit_storage_up",
            "1 when the rate-limit storage answers the web process that was scraped, else 0.",
            value=1 if self.reachable() else 0)


def registry(lease_s, rate_limit_storage_reachable):
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(JobsCollector(lease_s))
    collectors.register(CountersCollector())
    collectors.register(CallbacksCollector())
    collectors.register(RateLimitStorageCollector(rate_limit_storage_reachable))
    return collectors


def text(collectors):
    """The metrics in the Prometheus text format."""
    return generate_latest(collectors)
