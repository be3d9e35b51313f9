"""A minimal loopback receiver for both exporters, run in its own process (so it never competes for the
benchmark's GIL).

Every POST does the same work whatever its path: read the body, gunzip it when it is gzip-encoded, answer
200 with keep-alive. ``.../_json`` (OpenObserve) bodies are JSON arrays of flat records: the record count
is the number of ``"event_id":`` keys (a key cannot occur unescaped inside a JSON string value), checked
once per connection against a full ``json.loads``. The answer is OpenObserve's
``{"code":200,"status":[{"name":"audit","successful":N,"failed":0}]}``. ``/v1/traces`` (OTLP/HTTP) gets
an empty ``ExportTraceServiceResponse``. ``GET /stats`` returns the totals as JSON.

Run: ``python bench_receiver.py`` prints the port it listens on (127.0.0.1 only), then serves until killed.
"""

from __future__ import annotations

import json
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict

__all__ = ["Handler", "main"]

_RECORD_KEY = b'"event_id":'
_TOTALS: Dict[str, int] = {"requests": 0, "records": 0, "body_bytes": 0, "wire_bytes": 0, "mismatches": 0}
_LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    """Reads, decompresses and acknowledges; nothing else."""

    protocol_version = "HTTP/1.1"  # keep-alive: both clients reuse one pooled connection
    disable_nagle_algorithm = True  # no 40 ms delayed-ACK stalls between the header and body writes
    _checked = False

    def log_message(self, format: str, *args: object) -> None:
        """Silence the per-request access log."""

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        head = (
            f"HTTP/1.1 {status} OK\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
        ).encode("ascii")
        self.wfile.write(head + body)  # one write: one segment on the wire

    def do_GET(self) -> None:
        """``/stats``: the totals so far."""
        with _LOCK:
            body = json.dumps(_TOTALS).encode()
        self._reply(200, body, "application/json")

    def do_POST(self) -> None:
        """Read, gunzip if needed, count O2 records, answer 200."""
        length = int(self.headers.get("Content-Length") or 0)
        wire = self.rfile.read(length)
        body = zlib.decompress(wire, 47) if self.headers.get("Content-Encoding") == "gzip" else wire
        if self.path.endswith("/_json"):
            count = body.count(_RECORD_KEY)
            mismatch = 0
            if not self._checked:  # one handler instance per connection
                self._checked = True
                mismatch = int(len(json.loads(body)) != count)
            answer = b'{"code":200,"status":[{"name":"audit","successful":%d,"failed":0}]}' % count
            content_type = "application/json"
        else:
            count = 0
            mismatch = 0
            answer = b""
            content_type = "application/x-protobuf"
        with _LOCK:
            _TOTALS["requests"] += 1
            _TOTALS["records"] += count
            _TOTALS["body_bytes"] += len(body)
            _TOTALS["wire_bytes"] += len(wire)
            _TOTALS["mismatches"] += mismatch
        self._reply(200, answer, content_type)


def main() -> None:
    """Serve on an ephemeral 127.0.0.1 port; print the port first."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
