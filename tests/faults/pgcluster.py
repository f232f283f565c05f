"""A private PostgreSQL server for the scenarios that restart the database, or fail over to
a synchronous standby of it.

initdb into a temporary folder, on a free loopback port, with the server binaries of the
machine (PG_BINDIR, else /usr/lib/postgresql/<newest>/bin, else `pg_config --bindir`).
As root it runs as the postgres user (initdb refuses root). The shared server of the test
suite is never touched.
"""
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

import psutil


class ClusterUnavailable(Exception):
    """No private server can be made here (no binaries, no postgres user)."""


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _bindir():
    candidates = [os.environ["PG_BINDIR"]] if os.environ.get("PG_BINDIR") else \
        sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True)
    if not candidates and shutil.which("pg_config"):
        candidates = [subprocess.run(["pg_config", "--bindir"], capture_output=True,
                                     text=True).stdout.strip()]
    for folder in candidates:
        if os.path.exists(os.path.join(folder, "initdb")):
            return folder
    raise ClusterUnavailable(f"no initdb in {candidates or 'PG_BINDIR, /usr/lib/postgresql'}")


def _version(folder):
    name = os.path.basename(os.path.dirname(folder))
    return int(name) if name.isdigit() else 0


class PrivateCluster:
    """A running PostgreSQL server of our own: restart(mode) it, add_standby() to it, kill()
    it, then destroy() it.

    It listens on 127.0.0.1, and on the addresses of listen_on too, where it trusts clients
    from the networks of `trusted` (the hosts of tests/faults/hosts.py, say)."""

    def __init__(self, listen_on=(), trusted=()):
        self._make_base()
        try:
            self._pg("initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                     "--no-sync", "--no-instructions")
            self._configure("max_connections = 200\n", listen_on)
            with open(os.path.join(self.data, "pg_hba.conf"), "a") as hba:
                hba.writelines(f"host all all {network} trust\n" for network in trusted)
            self._pg_ctl("start")
        except (OSError, subprocess.SubprocessError) as exc:
            self.destroy()
            raise ClusterUnavailable(f"could not start a private PostgreSQL: {exc}") from None
        except ClusterUnavailable:
            self.destroy()
            raise

    def _make_base(self):
        self.bindir = _bindir()
        self.base = tempfile.mkdtemp(prefix="conveyor-pg-")
        self.data = os.path.join(self.base, "data")
        self.log_path = os.path.join(self.base, "server.log")
        self.port = free_port()
        self._as_owner = []
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                self.destroy()
                raise ClusterUnavailable("running as root and there is no postgres user "
                                         "to run initdb as") from None
            os.chown(self.base, owner.pw_uid, owner.pw_gid)
            self._as_owner = ["runuser", "-u", "postgres", "--"]

    def _configure(self, lines, listen_on=()):
        """Append to postgresql.conf: this server's own addresses, port and socket folder,
        and lines."""
        with open(os.path.join(self.data, "postgresql.conf"), "a") as conf:
            conf.write(f"listen_addresses = '{','.join(['127.0.0.1', *listen_on])}'\n"
                       f"port = {self.port}\nunix_socket_directories = '{self.base}'\n{lines}")

    @property
    def url(self):
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def create_database(self, name):
        self._pg("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def restart(self, mode="fast"):
        """`pg_ctl restart -m fast|immediate`: every connection is cut, the server comes back
        on the same port (after crash recovery, for immediate)."""
        self._pg_ctl("restart", "-m", mode)

    def add_standby(self, name="standby"):
        """A hot standby of this server, streaming from it, and synchronous: from the return
        on, a commit here is acknowledged once the standby has flushed it. Its
        pg_basebackup -R names it `name` (application_name), which
        synchronous_standby_names names in turn."""
        standby = Standby(self, name)
        try:
            with open(os.path.join(self.data, "postgresql.conf"), "a") as conf:
                conf.write(f"synchronous_standby_names = '{name}'\n")
            self._pg_ctl("reload")
            self.wait_for_sync(name)
        except BaseException:
            standby.destroy()
            raise
        return standby

    def wait_for_sync(self, name, timeout_s=60.0):
        deadline = time.monotonic() + timeout_s
        while self._replication_state(name) != ("streaming", "sync"):
            if time.monotonic() > deadline:
                raise ClusterUnavailable(f"standby {name} not streaming synchronously after "
                                         f"{timeout_s:g}s: {self._replication_state(name)}")
            time.sleep(0.05)

    def _replication_state(self, name):
        result = self._pg("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                          "-AXtc", "SELECT state || ',' || sync_state FROM pg_stat_replication "
                          f"WHERE application_name = '{name}'")
        return tuple(result.stdout.strip().split(",")) if result.stdout.strip() else None

    def postmaster_pid(self):
        with open(os.path.join(self.data, "postmaster.pid")) as pid_file:
            return int(pid_file.readline())

    def kill(self):
        """kill -9 the postmaster and every process of the server at once, as when its
        machine is lost: nothing is flushed or shut down, no connection is told why (the
        sockets close). Returns once none of them runs."""
        postmaster = psutil.Process(self.postmaster_pid())
        processes = [postmaster, *postmaster.children(recursive=True)]
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(processes, timeout=30)
        # Its pid may go to another process, which destroy()'s pg_ctl stop would signal.
        os.remove(os.path.join(self.data, "postmaster.pid"))

    def destroy(self):
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            try:
                self._pg_ctl("stop", "-m", "immediate")
            except subprocess.SubprocessError:
                pass
        shutil.rmtree(self.base, ignore_errors=True)

    def _pg_ctl(self, action, *args):
        self._pg("pg_ctl", "-D", self.data, "-l", self.log_path, "-w", "-t", "120", action, *args)

    def _pg(self, tool, *args):
        result = subprocess.run([*self._as_owner, os.path.join(self.bindir, tool), *args],
                                capture_output=True, text=True, timeout=180)
        if result.returncode != 0:
            raise subprocess.SubprocessError(
                f"{tool} {' '.join(args)} exited {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()[-500:]}")
        return result


class Standby(PrivateCluster):
    """A streaming hot standby of a PrivateCluster (read-only until promote()), on its own
    port and folder: pg_basebackup -R of the primary, as the documentation's recipe says."""

    def __init__(self, primary, name):
        self._make_base()
        self.name = name
        try:
            self._pg("pg_basebackup", "-D", self.data, "-R", "-X", "stream", "-c", "fast",
                     "-d", f"host=127.0.0.1 port={primary.port} user=postgres "
                           f"application_name={name}")
            self._configure("hot_standby = on\n")
            self._pg_ctl("start")
        except (OSError, subprocess.SubprocessError) as exc:
            self.destroy()
            raise ClusterUnavailable(f"could not start a standby: {exc}") from None

    def promote(self):
        """`pg_ctl promote -w`: returns once the standby is a primary taking writes."""
        self._pg_ctl("promote")
