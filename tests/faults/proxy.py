"""A TCP proxy on loopback that can partition its clients from the database.

`cut()` stops forwarding in both directions but keeps every socket open: no FIN, no RST,
each end just stops hearing from the other, as in a real partition (bytes pile up in the
kernel's buffers; a new connection is accepted but never answered). `heal()` delivers
what was held and resumes. `cut_after(predicate)` cuts as it forwards the first
client message the predicate picks (it sees that message and the one before it on the
same connection), to partition a process at an exact point of its protocol (inside a
transaction, say).
"""
import socket
import threading


class PartitionProxy:
    def __init__(self, upstream_host, upstream_port):
        self.upstream = (upstream_host, upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._trigger = None
        self._lock = threading.Lock()
        self._sockets = set()
        self.closed = False
        self.cuts = 0
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def url_for(self, database_url):
        """database_url, redirected through this proxy."""
        from urllib.parse import urlparse, urlunparse
        parts = urlparse(database_url)
        user = f"{parts.username}@" if parts.username else ""
        return urlunparse(parts._replace(netloc=f"{user}127.0.0.1:{self.port}"))

    @property
    def partitioned(self):
        return not self._open.is_set()

    def cut(self):
        with self._lock:
            self._trigger = None
            if self._open.is_set():
                self.cuts += 1
            self._open.clear()

    def heal(self):
        with self._lock:
            self._trigger = None
            self._open.set()

    def cut_after(self, predicate):
        """Cut once a client message for which predicate(message, previous message on its
        connection) is true has been forwarded."""
        with self._lock:
            self._trigger = predicate

    def close(self):
        self.closed = True
        self._open.set()
        for sock in [self.listener, *self._sockets]:
            try:
                sock.close()
            except OSError:
                pass

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client):
        self._open.wait()
        try:
            server = socket.create_connection(self.upstream, timeout=10)
            server.settimeout(None)
        except OSError:
            client.close()
            return
        self._sockets.update((client, server))
        threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source, target, from_client):
        previous = b""
        try:
            while not self.closed:
                self._open.wait()
                data = source.recv(65536)
                if not data:
                    target.shutdown(socket.SHUT_WR)
                    return
                trigger = self._trigger
                if from_client and trigger is not None and trigger(data, previous):
                    self.cut()  # first, so that no answer to this message can get back
                else:
                    self._open.wait()  # read just before a cut: held like the rest
                target.sendall(data)
                previous = data
        except OSError:
            pass
        finally:
            for sock in (source, target):
                self._sockets.discard(sock)
                try:
                    sock.close()
                except OSError:
                    pass
