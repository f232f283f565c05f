"""A private pgbouncer in transaction-pooling mode, in front of the test PostgreSQL server.

Debian's `pgbouncer` binary (installed by .ci/run), started with an ini of our own on a
free loopback port; the packaged service, if any, plays no part. auth_type=trust, as the
test server's own: the users only need to be listed in the auth_file. As root it runs as
the postgres user (pgbouncer refuses root). Used by the tests (conftest's `pgbouncer`
fixture) and by the benchmarks (`python -m tests.pgbouncer` prints its URL and pools).
"""
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from urllib.parse import urlparse, urlunparse

import psycopg2

INI = """\
[databases]
* = host={host} port={port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen_port}
unix_socket_dir =
auth_type = trust
auth_file = {folder}/users.txt
admin_users = {user}
pool_mode = transaction
default_pool_size = {pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 2000
max_db_connections = 0
max_user_connections = {max_user_connections}
idle_transaction_timeout = {idle_transaction_timeout}
ignore_startup_parameters = {ignore_startup_parameters}
server_check_delay = 0
server_login_retry = 1
logfile = {folder}/pgbouncer.log
pidfile = {folder}/pgbouncer.pid
"""


class PgbouncerUnavailable(Exception):
    """No pgbouncer binary here."""


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Pgbouncer:
    """A running pgbouncer for the server of server_url: url() maps a database URL of that
    server to the same database through the pooler; stop() ends it."""

    def __init__(self, server_url, pool_size=20, idle_transaction_timeout=0,
                 ignore_startup_parameters=("extra_float_digits",), max_user_connections=0):
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        if not os.path.exists(binary):
            raise PgbouncerUnavailable("no pgbouncer binary (apt-get install pgbouncer)")
        server = urlparse(server_url)
        self.user = server.username or "postgres"
        self.port = free_port()
        self.folder = tempfile.mkdtemp(prefix="conveyor-pgbouncer-")
        with open(os.path.join(self.folder, "pgbouncer.ini"), "w") as f:
            f.write(INI.format(host=server.hostname or "127.0.0.1", port=server.port or 5432,
                               listen_port=self.port, folder=self.folder, user=self.user,
                               pool_size=pool_size, max_user_connections=max_user_connections,
                               idle_transaction_timeout=idle_transaction_timeout,
                               ignore_startup_parameters=",".join(ignore_startup_parameters)))
        with open(os.path.join(self.folder, "users.txt"), "w") as f:
            f.write(f'"{self.user}" ""\n')
        command = [binary, os.path.join(self.folder, "pgbouncer.ini")]
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            for name in ["", *os.listdir(self.folder)]:
                os.chown(os.path.join(self.folder, name), owner.pw_uid, owner.pw_gid)
            command[1:1] = ["-u", "postgres"]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._wait_until_accepting(server)

    def _wait_until_accepting(self, server, timeout=15.0):
        deadline = time.monotonic() + timeout
        probe = self.url(urlunparse(server))
        while True:
            try:
                psycopg2.connect(probe, connect_timeout=2).close()
                return
            except psycopg2.OperationalError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise PgbouncerUnavailable(f"pgbouncer did not start: {exc}\n{self.log()}")
                time.sleep(0.05)

    def url(self, database_url):
        """database_url (of the server behind the pooler), through the pooler."""
        parts = urlparse(database_url)
        credentials = f"{parts.username}@" if parts.username else ""
        return urlunparse(parts._replace(netloc=f"{credentials}127.0.0.1:{self.port}"))

    def show(self, what):
        """The admin console's SHOW <what> (POOLS, STATS, ...), as a list of dicts."""
        admin = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user,
                                 dbname="pgbouncer")
        admin.autocommit = True
        try:
            with admin.cursor() as cursor:
                cursor.execute(f"SHOW {what}")
                names = [column.name for column in cursor.description]
                return [dict(zip(names, row)) for row in cursor.fetchall()]
        finally:
            admin.close()

    def log(self):
        try:
            with open(os.path.join(self.folder, "pgbouncer.log")) as f:
                return f.read()
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)


def watch(bouncer, every_s=0.1):
    """Until Ctrl-C: each second with clients, one line of the peaks SHOW POOLS showed,
    summed over the databases behind the pooler (connections; the longest wait)."""
    while True:
        peak, second = {}, time.monotonic() + 1.0
        while time.monotonic() < second:
            now = {}
            for pool in bouncer.show("POOLS"):
                if pool["database"] == "pgbouncer":
                    continue
                for name in ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used"):
                    now[name] = now.get(name, 0) + pool[name]
                wait = pool["maxwait"] * 1_000_000 + pool["maxwait_us"]
                now["maxwait_us"] = max(now.get("maxwait_us", 0), wait)
            for name, value in now.items():
                peak[name] = max(peak.get(name, 0), value)
            time.sleep(every_s)
        if peak.get("cl_active") or peak.get("cl_waiting"):
            print(time.strftime("%H:%M:%S"), " ".join(f"{k}={v}" for k, v in peak.items()),
                  flush=True)


if __name__ == "__main__":  # for the benchmarks: `python tests/pgbouncer.py [pool size]`
    import signal
    import sys
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the pooler too
    url = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    # Each benchmark makes a database of its own, and pgbouncer a pool for each: capped per
    # user, benchmarks run at once share `size` server connections, as web and workers
    # sharing one database do.
    bouncer = Pgbouncer(url, pool_size=size, max_user_connections=size)
    print(f"BENCH_PGBOUNCER=127.0.0.1:{bouncer.port}", flush=True)
    try:
        watch(bouncer)
    except KeyboardInterrupt:
        pass
    finally:
        bouncer.stop()
