"""A private PostgreSQL server for the scenarios that restart the database.

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
    """A running PostgreSQL server of our own: restart(mode) it, then destroy() it.

    It listens on 127.0.0.1, and on the addresses of listen_on too, where it trusts clients
    from the networks of `trusted` (the hosts of tests/faults/hosts.py, say)."""

    def __init__(self, listen_on=(), trusted=()):
        self.bindir = _bindir()
        self.base = tempfile.mkdtemp(prefix="conveyor-pg-")
        self.data = os.path.join(self.base, "data")
        self.log_path = os.path.join(self.base, "server.log")
        self.port = free_port()
        self._as_owner = []
        try:
            if os.geteuid() == 0:
                try:
                    owner = pwd.getpwnam("postgres")
                except KeyError:
                    raise ClusterUnavailable("running as root and there is no postgres user "
                                             "to run initdb as") from None
                os.chown(self.base, owner.pw_uid, owner.pw_gid)
                self._as_owner = ["runuser", "-u", "postgres", "--"]
            self._pg("initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                     "--no-sync", "--no-instructions")
            with open(os.path.join(self.data, "postgresql.conf"), "a") as conf:
                conf.write(f"listen_addresses = '{','.join(['127.0.0.1', *listen_on])}'\n"
                           f"port = {self.port}\n"
                           f"unix_socket_directories = '{self.base}'\nmax_connections = 200\n")
            with open(os.path.join(self.data, "pg_hba.conf"), "a") as hba:
                hba.writelines(f"host all all {network} trust\n" for network in trusted)
            self._pg_ctl("start")
        except (OSError, subprocess.SubprocessError) as exc:
            self.destroy()
            raise ClusterUnavailable(f"could not start a private PostgreSQL: {exc}") from None
        except ClusterUnavailable:
            self.destroy()
            raise

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
