"""A TCP proxy for outage tests: forwards a loopback port to a backend (PostgreSQL, moto's S3)
and, on `cut()`, drops every connection and refuses new ones until `restore()`.

While cut, new connections are reset as soon as they are accepted (the listening socket stays,
so the port stays the proxy's): to a client that looks like a backend that is down.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType


class TcpProxy:
    """127.0.0.1:`port` forwarded to `backend`; threads, one pair per connection."""

    def __init__(self, backend_host: str, backend_port: int) -> None:
        self._backend = (backend_host, backend_port)
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._up = True
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self._listener.settimeout(0.1)  # so the accept loop notices close()
        self.port: int = self._listener.getsockname()[1]
        self.connections_made = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                up = self._up
            if not up:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self._backend, timeout=10)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                if not self._up:  # cut meanwhile
                    _reset(client)
                    _reset(upstream)
                    continue
                self._connections |= {client, upstream}
                self.connections_made += 1
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        """Drop every connection (a reset, mid-statement or mid-transfer alike) and refuse new
        ones until restore()."""
        with self._lock:
            self._up = False
            connections, self._connections = self._connections, set()
        for connection in connections:
            _reset(connection)

    def restore(self) -> None:
        """Forward new connections again."""
        with self._lock:
            self._up = True

    def close(self) -> None:
        self.cut()
        self._closed = True
        self._listener.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _reset(connection: socket.socket) -> None:
    """Close with a TCP reset, as a crashed peer or a dropped network path looks."""
    with contextlib.suppress(OSError):
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)
    connection.close()
