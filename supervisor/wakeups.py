"""Wake-ups: new jobs announced by PostgreSQL NOTIFY reach one waiting worker each.

The supervisor holds the host's only LISTEN connection; a notification "<queue>:<count>"
wakes up to count of its workers through their wake pipes, those asleep first, then those
whose claim may have just missed the job; busy workers claim again when they finish
anyway. So one job wakes one worker per host, not every worker. Polling (POLL_INTERVAL_S)
stays the fallback: a lost connection costs latency, never a job.
"""
import logging
import os

import psycopg2

import models
from supervisor import slots

log = logging.getLogger("conveyor.supervisor")

LISTEN_ERRORS = (psycopg2.Error, OSError)  # the LISTEN connection is psycopg2's own


class Listener:
    """A LISTEN connection that says which queues got how many new jobs."""

    def __init__(self, channel, url):
        self.channel = channel
        self.url = url  # LISTEN_DATABASE_URL: never a transaction pooler, where LISTEN is lost
        self.connection = None
        self.fd = None  # kept: a broken connection no longer tells its socket

    @property
    def connected(self):
        return self.connection is not None

    def connect(self):
        self.connection = psycopg2.connect(self.url, **models.LINK_PARAMS)
        self.connection.autocommit = True
        with self.connection.cursor() as cursor:
            cursor.execute(f"LISTEN {self.channel}")
        self.fd = self.connection.fileno()
        return self.fd

    def announced(self):
        """{queue: new jobs} from the notifications received; raises when the link broke."""
        self.connection.poll()
        counts = {}
        for notification in self.connection.notifies:
            queue, _, count = notification.payload.rpartition(":")
            counts[queue] = counts.get(queue, 0) + (int(count) if count.isdigit() else 1)
        self.connection.notifies.clear()
        return counts

    def close(self):
        connection, self.connection, self.fd = self.connection, None, None
        if connection is not None:
            try:
                connection.close()
            except psycopg2.Error:
                pass


class WakePipe:
    """The pipe a supervisor wakes one worker through; the worker sleeps on it."""

    def __init__(self):
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def wake(self):
        try:
            os.write(self.write_fd, b"!")
        except BlockingIOError:
            pass  # full: the worker has wake-ups enough waiting for it

    def drain(self):
        try:
            while os.read(self.read_fd, 4096):
                pass
        except BlockingIOError:
            pass


def wake_for(counts, queues, slot_states):
    """Wake one worker per announced job of the queues this supervisor serves; returns how
    many were woken. slot_states: (slot, pipe) of each live worker."""
    wanted = sum(n for queue, n in counts.items() if not queues or queue in queues)
    asleep = [pipe for slot, pipe in slot_states if slot.state == slots.WAITING]
    claiming = [pipe for slot, pipe in slot_states if slot.state == slots.CLAIMING]
    woken = (asleep + claiming)[:wanted]
    for pipe in woken:
        pipe.wake()
    return len(woken)
