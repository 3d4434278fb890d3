"""A HiveServer2 with a production Hive's query latency: a thrift proxy that holds every statement N seconds.

    .venv/bin/python -m tests.hive_latency_proxy --upstream 127.0.0.1:10000 --latency 5 [--port 10001]

On a production Hive (Tez or MapReduce on YARN) every query pays seconds to tens of seconds of planning,
container start-up and scheduling before its first row; the local Spark Thrift Server answers in a fraction of a
second, so a plan that sends many queries looks free here. The proxy sits between a client and HiveServer2 and
passes every call through at once, but holds the answer to each ExecuteStatement until `latency_s` after the
statement was sent: no statement's first row can be fetched sooner, and the server works on the query meanwhile,
as a production Hive plans it and starts its containers (a query that takes longer here is not held further).
Metadata calls (GetColumns, GetTables ...) are not held: Hive answers them from the metastore without planning a
query. Calls named in `unanswered` are swallowed, as by a server that hangs on them. It records every statement it sees (DESCRIBE, SET, USE, SELECT ...) and the name of every call, so tests
can count what a job sends.

It speaks the binary thrift transport with SASL framing (RETRO_HIVE_AUTH NONE, LDAP or KERBEROS without a
security layer): each request is one length-prefixed frame holding one thrift message. NOSASL is not supported.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import struct
import threading
import time
from typing import Any


class HiveLatencyProxy:
    """A TCP proxy in front of HiveServer2: each statement is answered `latency_s` on at the earliest, and kept."""

    def __init__(self, *, upstream_host: str, upstream_port: int, latency_s: float = 0.0, port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.latency_s = latency_s
        self.unanswered: set[str] = set()  # names of calls never passed on: the server seems not to answer them
        self._lock = threading.Lock()
        self._statements: list[str] = []
        self._calls: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", port))
        self.host, self.port = "127.0.0.1", int(self._listener.getsockname()[1])
        self._sockets: set[socket.socket] = set()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="hive-latency-proxy", daemon=True)

    def __enter__(self) -> HiveLatencyProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for s in list(self._sockets):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
        self._thread.join(timeout=5)

    @property
    def statements(self) -> list[str]:
        """Every statement sent through the proxy so far, in the order they arrived."""
        with self._lock:
            return list(self._statements)

    @property
    def calls(self) -> list[str]:
        """The name of every thrift call sent through the proxy so far (OpenSession, GetColumns, FetchResults ...)."""
        with self._lock:
            return list(self._calls)

    def clear(self) -> None:
        with self._lock:
            self._statements.clear()
            self._calls.clear()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=30)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets.update((client, server))
            sent_at: list[float] = []  # when this connection's statements were sent, oldest first
            threading.Thread(target=self._requests, args=(client, server, sent_at), daemon=True).start()
            threading.Thread(target=self._answers, args=(server, client, sent_at), daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket, sent_at: list[float]) -> None:
        """Client to server, frame by frame: SASL handshake messages pass, each thrift call is read and noted."""
        try:
            while True:
                head = _read(client, 4)
                if head[0] != 0:  # a SASL handshake message: status byte, then a 4-byte length and the payload
                    head += _read(client, 1)
                    length = struct.unpack(">I", head[1:5])[0]
                else:  # a data frame: 4-byte length (a request is far below 16 MB), one thrift message
                    length = struct.unpack(">I", head)[0]
                payload = _read(client, length)
                if head[0] == 0:
                    name, statement = _call(payload)
                    with self._lock:
                        self._calls.append(name)
                        if statement is not None:
                            self._statements.append(statement)
                            sent_at.append(time.monotonic())
                        if name in self.unanswered:
                            continue
                server.sendall(head + payload)
        except (OSError, EOFError):
            pass
        finally:
            self._close(client, server)

    def _answers(self, server: socket.socket, client: socket.socket, sent_at: list[float]) -> None:
        """Server to client, frame by frame: an ExecuteStatement's answer waits until latency_s after its call."""
        try:
            handshake = True
            while True:
                if handshake:  # status byte, 4-byte length, payload; until the server says COMPLETE (or fails)
                    head = _read(server, 5)
                    client.sendall(head + _read(server, struct.unpack(">I", head[1:5])[0]))
                    handshake = head[0] == _SASL_OK
                    continue
                head = _read(server, 4)
                payload = _read(server, struct.unpack(">I", head)[0])
                if _name(payload) == "ExecuteStatement":
                    with self._lock:
                        since = sent_at.pop(0) if sent_at else time.monotonic()
                    wait = since + self.latency_s - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                client.sendall(head + payload)
        except (OSError, EOFError):
            pass
        finally:
            self._close(client, server)

    def _close(self, *sockets: socket.socket) -> None:
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
            with self._lock:
                self._sockets.discard(s)


def _read(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


_SASL_OK = 2  # thrift_sasl's status: START 1, OK 2, BAD 3, ERROR 4, COMPLETE 5


def _name(message: bytes) -> str:
    """The name in a strict binary thrift message's header: version and type, then a length-prefixed name."""
    if len(message) < 8:
        return ""
    (length,) = struct.unpack(">i", message[4:8])
    return message[8 : 8 + length].decode("utf-8", "replace") if 0 <= length <= 64 else ""


def _call(message: bytes) -> tuple[str, str | None]:
    """The name of a thrift call, and its SQL if it is an ExecuteStatement."""
    from TCLIService import TCLIService
    from thrift.protocol.TBinaryProtocol import TBinaryProtocol
    from thrift.transport.TTransport import TMemoryBuffer

    protocol = TBinaryProtocol(TMemoryBuffer(message))
    try:
        name, _, _ = protocol.readMessageBegin()
    except Exception:
        return "?", None
    if name != "ExecuteStatement":
        return str(name), None
    args: Any = TCLIService.ExecuteStatement_args()
    args.read(protocol)
    return str(name), str(args.req.statement)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True, help="host:port of HiveServer2")
    parser.add_argument("--latency", type=float, default=5.0, help="seconds before any statement's first row")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    host, port = args.upstream.rsplit(":", 1)
    with HiveLatencyProxy(upstream_host=host, upstream_port=int(port), latency_s=args.latency, port=args.port) as p:
        print(
            f"HiveServer2 at {host}:{port}, each statement answered {args.latency} s on, at {p.host}:{p.port}",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
