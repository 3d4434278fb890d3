"""An HTTP proxy in front of a model server that misbehaves on purpose.

It forwards V2 inference requests and, by chance, answers 503, hangs past the client's timeout, or resets
the connection; and it answers 400 to any batch holding a poison row (a marker value in one input), as a
model that validates its inputs would. Every decision is counted so a test can compare.
"""

from __future__ import annotations

import logging
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import orjson

log = logging.getLogger(__name__)


@dataclass
class Faults:
    unavailable: float = 0.05  # 503
    hang: float = 0.01  # no answer for hang_s
    reset: float = 0.01  # TCP reset, no answer
    hang_s: float = 30.0
    poison_input: str = "voice_minutes"
    poison_value: int = -1
    seed: int = 7
    counts: dict[str, int] = field(
        default_factory=lambda: {"forwarded": 0, "unavailable": 0, "hang": 0, "reset": 0, "poison": 0}
    )
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1
        if key != "forwarded":  # the worker's log shows when each fault struck, to set beside its progress
            log.info("fault proxy: %s", key)


class FaultProxy:
    """A ThreadingHTTPServer on a free loopback port forwarding to target with the given faults."""

    def __init__(self, target: str, faults: Faults) -> None:
        self.target = target.rstrip("/")
        self.faults = faults
        rng = random.Random(faults.seed)
        client = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=16))
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                # Without TCP_NODELAY every small answer waits ~40 ms for the client's delayed ACK, a cost a
                # real model server (uvicorn sets it) does not have.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                resp = client.get(proxy.target + self.path)
                self._reply(resp.status_code, resp.content)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                f = proxy.faults
                with f.lock:
                    roll = rng.random()
                if roll < f.reset:
                    f.count("reset")
                    # SO_LINGER 0: close() sends RST, as a crashing server or a load balancer would.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                if roll < f.reset + f.hang:
                    f.count("hang")
                    time.sleep(f.hang_s)
                    self.close_connection = True
                    return
                if roll < f.reset + f.hang + f.unavailable:
                    f.count("unavailable")
                    self._reply(503, b'{"error": "injected: model server overloaded"}')
                    return
                poison = proxy._poison_rows(body)
                if poison:
                    f.count("poison")
                    msg = f"invalid value {f.poison_value} in {f.poison_input} at row(s) {poison[:5]}"
                    self._reply(400, orjson.dumps({"error": msg}))
                    return
                f.count("forwarded")
                resp = client.post(proxy.target + self.path, content=body, headers={"content-type": "application/json"})
                self._reply(resp.status_code, resp.content)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    def _poison_rows(self, body: bytes) -> list[int]:
        """Rows of the poison input holding the poison value, found in the raw bytes.

        The proxy runs in the worker's process and shares its interpreter: parsing every 500 KB request into
        Python objects would slow the worker down more than the faults themselves, so it scans bytes instead.
        """
        name = f'"name":"{self.faults.poison_input}"'.encode()
        at = body.find(name)
        if at < 0:
            return []
        start = body.find(b'"data":[', at) + len(b'"data":[')
        end = body.find(b"]", start)
        marker = str(self.faults.poison_value).encode()
        if start < len(b'"data":[') or end < 0 or marker not in body[start:end]:
            return []
        return [i for i, v in enumerate(body[start:end].split(b",")) if v.strip() == marker]

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
