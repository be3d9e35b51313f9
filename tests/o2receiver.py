"""A test double of OpenObserve's ``_json`` ingestion API (stdlib only).

:class:`FakeOpenObserve` serves ``POST {base}/api/{org}/{stream}/_json`` on 127.0.0.1 the way
``/work/shared/docs/openobserve.md`` section 2 describes the real server, stores the records it accepts
(normalized as in section 3), and answers ``_search`` (section 4) over them. Tests script failures
(status storms, per-record rejections, silent loss, hangs) and wait for what the server saw with
condition waits that have a deadline, never with sleeps.

Typical use::

    with FakeOpenObserve() as o2:
        o2.respond_status(503, times=2)
        ...  # point the exporter at o2.url with o2.user / o2.password
        records = o2.wait_for_records(3)
        statuses = [r.status for r in o2.wait_for_requests(3)]

Every piece of shared state (stored records, the request log, the behaviour queue, the hold flag) is
guarded by one :class:`threading.Condition`; every change notifies it, so the ``wait_for_*`` helpers and
:meth:`FakeOpenObserve.wait_until` wake as soon as their condition can have become true.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import dataclasses
import email.utils
import errno
import http
import json
import re
import socket
import socketserver
import sys
import threading
import time
import traceback
import urllib.parse
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

__all__ = [
    "TOO_FAR_ERROR",
    "TOO_OLD_ERROR",
    "FakeOpenObserve",
    "ReceivedRequest",
    "format_key",
    "format_stream_name",
    "normalize_record",
    "parse_timestamp_micros",
]

Record = Dict[str, Any]

TOO_OLD_ERROR = "Too old data, only last 5 hours data can be ingested. Data discarded."
TOO_FAR_ERROR = "Too far data, only 24 hours in future data can be ingested. Data discarded."
UNAUTHORIZED = "Unauthorized Access"
PAYLOAD_TOO_LARGE = "A payload reached size limit."
FLATTEN_LEVEL = 3  # ZO_INGEST_FLATTEN_LEVEL
HOUR_MICROS = 3600 * 1_000_000

# BASE_TIME (1971-01-01T00:00:00Z) in seconds; OpenObserve picks a timestamp's unit by comparing it with
# BASE_TIME expressed in ns, then us, then ms (config/src/utils/time.rs, parse_i64_to_timestamp_micros).
_BASE_TIME_S = 31_536_000
_BASE_TIME_NS = _BASE_TIME_S * 1_000_000_000
_BASE_TIME_US = _BASE_TIME_S * 1_000_000
_BASE_TIME_MS = _BASE_TIME_S * 1_000

_INGEST_RE = re.compile(r"^(?P<prefix>(?:/[^/]+)*?)/api/(?P<org>[^/]+)/(?P<stream>[^/]+)/_json/?$")
_SEARCH_RE = re.compile(r"^(?P<prefix>(?:/[^/]+)*?)/api/(?P<org>[^/]+)/_search/?$")
_CONFIG_RE = re.compile(r"^(?P<prefix>(?:/[^/]+)*?)/config/?$")
_HEALTHZ_RE = re.compile(r"^(?P<prefix>(?:/[^/]+)*?)/healthz/?$")
_FROM_RE = re.compile(r"\bFROM\s+(?:\"([^\"]+)\"|'([^']+)'|`([^`]+)`|([A-Za-z0-9_:.\-]+))", re.IGNORECASE)
_INT_RE = re.compile(r"^[+-]?[0-9]+$")
_FLOAT_RE = re.compile(r"^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$")

_JOIN_TIMEOUT = 5.0  # upper bound for stop() waiting on its threads


# --------------------------------------------------------------------------------------------------
# Normalization helpers (openobserve.md section 3)
# --------------------------------------------------------------------------------------------------


def format_stream_name(name: str) -> str:
    """Format a stream name like OpenObserve: runs outside ``[a-zA-Z0-9_:]`` become ``_``, then lower-case."""
    return re.sub(r"[^a-zA-Z0-9_:]+", "_", name).lower()


def format_key(key: str) -> str:
    """Format a field name like OpenObserve: lower-case, then each char outside ``[a-z0-9_]`` -> ``_``."""
    return re.sub(r"[^a-z0-9_]", "_", key.lower())


def _flatten_into(obj: Record, prefix: str, depth: int, out: Record) -> None:
    for raw_key, value in obj.items():
        key = prefix + format_key(str(raw_key))
        if value is None:
            continue
        if isinstance(value, dict):
            if not value:
                continue
            if depth < FLATTEN_LEVEL:
                _flatten_into(value, key + "_", depth + 1, out)
            else:
                out[key] = json.dumps(value, separators=(",", ":"))
        elif isinstance(value, list):
            if not value:
                continue
            out[key] = json.dumps(value, separators=(",", ":"))
        else:
            out[key] = value


def normalize_record(record: Record) -> Record:
    """Return ``record`` as OpenObserve would store it, before ``_timestamp`` handling.

    Keys are formatted with :func:`format_key` (colliding keys overwrite each other), ``null`` values and
    empty objects/arrays are dropped, nested objects are flattened with ``_`` down to 3 levels (deeper
    objects become JSON text) and arrays become JSON text.
    """
    out: Record = {}
    _flatten_into(record, "", 1, out)
    return out


def _i64_to_micros(value: int, now_us: int) -> int:
    if value == 0:
        return now_us
    if value > _BASE_TIME_NS:
        return value // 1000
    if value > _BASE_TIME_US:
        return value
    if value > _BASE_TIME_MS:
        return value * 1000
    return value * 1_000_000


def _parse_time_string(text: str) -> int:
    """Parse the string forms OpenObserve accepts for ``_timestamp``; return microseconds."""
    if " " in text and len(text) == 19:
        parsed = datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
    elif "T" in text and " " not in text:
        if len(text) == 19:
            parsed = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
        else:
            iso = text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text
            parsed = datetime.fromisoformat(iso)
            if parsed.tzinfo is None:
                raise ValueError("RFC 3339 needs an offset")
    else:
        parsed = email.utils.parsedate_to_datetime(text)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
    delta = parsed - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def parse_timestamp_micros(value: Any, now_us: Optional[int] = None) -> int:
    """Convert a ``_timestamp`` value to integer microseconds like OpenObserve does.

    Integers (and floats, truncated) are unit-detected by magnitude: nanoseconds, microseconds,
    milliseconds or seconds; 0 means "now". Strings may be integers, decimals, ``YYYY-MM-DD HH:MM:SS``,
    ``YYYY-MM-DDTHH:MM:SS`` (UTC), RFC 3339 or RFC 2822. Raises :class:`ValueError` with the server's
    error text for anything else.
    """
    now = now_us if now_us is not None else time.time_ns() // 1000
    if isinstance(value, bool):
        raise ValueError("Invalid time format [type]")
    if isinstance(value, int):
        return _i64_to_micros(value, now)
    if isinstance(value, float):
        return _i64_to_micros(int(value), now)
    if isinstance(value, str):
        if _INT_RE.match(value):
            return _i64_to_micros(int(value), now)
        if _FLOAT_RE.match(value):
            return _i64_to_micros(int(float(value)), now)
        try:
            return _parse_time_string(value)
        except (ValueError, TypeError, IndexError, OverflowError) as exc:
            raise ValueError("invalid time format [string]") from exc
    raise ValueError("Invalid time format [type]")


# --------------------------------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------------------------------


@dataclass
class ReceivedRequest:
    """One HTTP request the fake received, as logged in :attr:`FakeOpenObserve.requests_log`.

    The object is created when the request (headers and body) has been read and is then updated in
    place, under the server's lock, until the request is finished: ``state`` goes from ``"processing"``
    (possibly through ``"held"`` or ``"hanging"``) to ``"answered"`` (``status`` set) or ``"abandoned"``
    (no answer was sent: the server was stopped or reset while the request was parked).
    """

    method: str
    path: str
    """Request path without the query string, as received (percent-encoding kept)."""
    route: str
    """``"ingest"``, ``"search"``, ``"config"``, ``"healthz"`` or ``"unknown"``."""
    headers: Dict[str, str]
    """Request headers, lower-case names; repeated headers joined with ``", "``."""
    body: bytes
    """Raw body as received (still compressed). Kept up to ``payload_limit + 1`` bytes."""
    time: float
    """``time.monotonic()`` when the request had been read."""
    query: str = ""
    prefix: str = ""
    """Path prefix seen before ``/api/`` (``ZO_BASE_URI``), ``""`` when none."""
    org: Optional[str] = None
    stream: Optional[str] = None
    """Stream name as it appeared in the path (unformatted)."""
    records: Optional[List[Any]] = None
    """Decoded JSON records exactly as the client sent them (a single object becomes a one-item list);
    ``None`` when the body could not be decoded or the route is not ingestion."""
    decode_error: Optional[str] = None
    body_size: int = 0
    """Full size of the raw body in bytes, even when ``body`` was truncated."""
    behaviour: Optional[str] = None
    """Description of the scripted behaviour this request consumed, if any."""
    status: Optional[int] = None
    """Status answered; ``None`` while in flight or when abandoned."""
    response_headers: Dict[str, str] = field(default_factory=dict)
    response_body: bytes = b""
    state: str = "processing"
    answered_at: Optional[float] = None

    @property
    def finished(self) -> bool:
        """True once the request was answered or abandoned."""
        return self.state in ("answered", "abandoned")

    def json(self) -> Any:
        """The answered body parsed as JSON."""
        return json.loads(self.response_body.decode("utf-8"))

    def summary(self) -> str:
        """One line for failure messages."""
        n = "-" if self.records is None else str(len(self.records))
        extra = f" [{self.behaviour}]" if self.behaviour else ""
        return f"{self.method} {self.path} records={n} -> {self.status} ({self.state}){extra}"


@dataclass
class _Behaviour:
    kind: str  # "status" | "reject" | "mismatch" | "hang"
    status: int = 200
    retry_after: Optional[str] = None
    body: Optional[str] = None
    failed: int = 0
    error: str = TOO_OLD_ERROR
    drop: int = 0
    seconds: float = 0.0

    def describe(self) -> str:
        if self.kind == "status":
            return f"status {self.status}"
        if self.kind == "reject":
            return f"reject last {self.failed}"
        if self.kind == "mismatch":
            return f"drop {self.drop} silently"
        return f"hang {self.seconds}s"


@dataclass
class _Stored:
    org: str
    stream: str  # formatted
    record: Record


@dataclass
class _Response:
    status: int
    body: bytes
    content_type: Optional[str]
    headers: Dict[str, str] = field(default_factory=dict)


class _Abandon(Exception):
    """The request must be dropped without an answer (server stopped or reset)."""


class _DecodeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------------------------------
# Body decoding
# --------------------------------------------------------------------------------------------------


def _inflate(data: bytes, wbits: int, limit: int, multi_member: bool) -> bytes:
    """Decompress ``data`` producing at most ``limit`` bytes; raise 413 beyond, 400 on corrupt input."""
    out = bytearray()
    decomp = zlib.decompressobj(wbits)
    buf = data
    while True:
        try:
            out += decomp.decompress(buf, limit + 1 - len(out))
        except zlib.error as exc:
            raise _DecodeError(400, f"invalid compressed body: {exc}") from exc
        if len(out) > limit:
            raise _DecodeError(413, PAYLOAD_TOO_LARGE)
        if decomp.eof:
            buf = decomp.unused_data
            if multi_member and buf.strip(b"\x00"):
                decomp = zlib.decompressobj(wbits)
                continue
            return bytes(out)
        if decomp.unconsumed_tail:
            buf = decomp.unconsumed_tail
            continue
        raise _DecodeError(400, "invalid compressed body: truncated stream")


def _decode_body(raw: bytes, content_encoding: str, limit: int) -> bytes:
    data = raw
    encodings = [e.strip().lower() for e in content_encoding.split(",") if e.strip()]
    for enc in reversed(encodings):
        if enc in ("identity", ""):
            continue
        if enc in ("gzip", "x-gzip"):
            data = _inflate(data, 16 + zlib.MAX_WBITS, limit, multi_member=True)
        elif enc == "deflate":
            try:
                data = _inflate(data, zlib.MAX_WBITS, limit, multi_member=False)
            except _DecodeError as exc:
                if exc.status != 400:
                    raise
                data = _inflate(data, -zlib.MAX_WBITS, limit, multi_member=False)
        else:  # br and zstd need non-stdlib modules; anything else is unknown to the server too
            raise _DecodeError(415, f"Unsupported Content-Encoding: {enc}")
    if len(data) > limit:
        raise _DecodeError(413, PAYLOAD_TOO_LARGE)
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_records(data: bytes) -> List[Any]:
    """Parse an ingestion body: a JSON array of objects or a single object."""
    try:
        text = data.decode("utf-8")
        value = json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _DecodeError(400, f"SerdeJsonError# {exc}") from exc
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return value
    raise _DecodeError(400, "SerdeJsonError# invalid type: expected a sequence or a map")


# --------------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    """One listening incarnation of the fake; :meth:`FakeOpenObserve.restart` makes a new one."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, fake: FakeOpenObserve) -> None:
        self.fake = fake
        self.stopped = False
        self.connections: Dict[socket.socket, threading.Thread] = {}
        super().__init__(("127.0.0.1", port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can stall; skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if self.stopped or isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
            return
        self.fake._record_server_error(traceback.format_exc())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    server_version = "FakeOpenObserve/1.0"
    # Headers and body go out in separate writes; without TCP_NODELAY, Nagle plus the client's delayed
    # ACK would add ~40 ms to every keep-alive response.
    disable_nagle_algorithm = True
    sys_version = ""

    # -- connection bookkeeping ------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        fake = self.server.fake
        with fake._cond:
            if self.server.stopped:
                self._kill_socket()
            else:
                self.server.connections[self.connection] = threading.current_thread()
                fake._connections_accepted += 1
                fake._cond.notify_all()

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            with self.server.fake._cond:
                self.server.connections.pop(self.connection, None)
                self.server.fake._cond.notify_all()

    def _kill_socket(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: the default writes every request to stderr."""

    # -- method dispatch -------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        fake = self.server.fake
        try:
            body, body_size = self._read_body(fake.payload_limit)
        except ValueError as exc:
            self.close_connection = True
            self._write(_text(400, str(exc)))
            return
        except _Abandon:
            self.close_connection = True
            return
        split = urllib.parse.urlsplit(self.path)
        path, query = split.path, split.query
        headers: Dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        entry = ReceivedRequest(
            method=self.command,
            path=path,
            route="unknown",
            headers=headers,
            body=body,
            time=time.monotonic(),
            query=query,
            body_size=body_size,
        )
        try:
            if self.command == "POST" and (m := _INGEST_RE.match(path)):
                entry.route = "ingest"
                entry.prefix = m["prefix"]
                entry.org = urllib.parse.unquote(m["org"])
                entry.stream = urllib.parse.unquote(m["stream"])
                response = fake._handle_ingest(entry, self.server)
            elif self.command == "POST" and (m := _SEARCH_RE.match(path)):
                entry.route = "search"
                entry.prefix = m["prefix"]
                entry.org = urllib.parse.unquote(m["org"])
                fake._log_request(entry)
                response = fake._handle_search(entry)
            elif self.command in ("GET", "HEAD") and (m := _CONFIG_RE.match(path)):
                entry.route = "config"
                entry.prefix = m["prefix"]
                fake._log_request(entry)
                response = _json_response(200, fake.config)
            elif self.command in ("GET", "HEAD") and (m := _HEALTHZ_RE.match(path)):
                entry.route = "healthz"
                entry.prefix = m["prefix"]
                fake._log_request(entry)
                response = _json_response(200, {"status": "ok"})
            else:
                fake._log_request(entry)
                response = _text(404, "Not Found")
        except _Abandon:
            self.close_connection = True
            return
        except Exception:  # a bug in the fake must show up as a 500 and in server_errors, not a hang
            fake._record_server_error(traceback.format_exc())
            if not any(r is entry for r in fake.requests_log):
                fake._log_request(entry)
            response = _text(500, "FakeOpenObserve internal error (see server_errors)")
        fake._finish_request(entry, response)
        self._write(response)

    def _read_body(self, limit: int) -> Tuple[bytes, int]:
        """Read the whole request body (Content-Length or chunked), keeping at most ``limit + 1`` bytes."""
        kept = bytearray()
        total = 0

        def take(n: int) -> None:
            nonlocal total
            while n > 0:
                chunk = self.rfile.read(min(n, 1 << 16))
                if not chunk:
                    raise _Abandon
                total += len(chunk)
                n -= len(chunk)
                room = limit + 1 - len(kept)
                if room > 0:
                    kept.extend(chunk[:room])

        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise _Abandon
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError as exc:
                    raise ValueError("bad chunk size") from exc
                if size == 0:
                    while True:  # trailers, up to the empty line
                        trailer = self.rfile.readline(65537)
                        if trailer in (b"\r\n", b"\n", b""):
                            break
                    break
                take(size)
                self.rfile.readline(65537)  # CRLF after the chunk
        else:
            length_header = self.headers.get("Content-Length")
            if length_header is not None:
                try:
                    length = int(length_header)
                except ValueError as exc:
                    raise ValueError("bad Content-Length") from exc
                if length < 0:
                    raise ValueError("bad Content-Length")
                take(length)
        return bytes(kept), total

    def _write(self, response: _Response) -> None:
        try:
            self.send_response(response.status)
            if response.content_type:
                self.send_header("Content-Type", response.content_type)
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(response.body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(response.body)
            self.wfile.flush()
        except OSError:
            self.close_connection = True


def _text(status: int, text: str, headers: Optional[Dict[str, str]] = None) -> _Response:
    return _Response(status, text.encode("utf-8"), "text/plain; charset=utf-8", dict(headers or {}))


def _json_response(status: int, value: Any, headers: Optional[Dict[str, str]] = None) -> _Response:
    body = json.dumps(value, separators=(",", ":")).encode("utf-8")
    return _Response(status, body, "application/json", dict(headers or {}))


def _default_scripted_body(status: int) -> _Response:
    if status == 401:
        return _text(401, UNAUTHORIZED, {"WWW-Authenticate": 'Basic realm="openobserve"'})
    if status in (400, 500, 503):
        return _json_response(status, {"code": status, "message": f"Error# scripted {status}"})
    if status == 413:
        return _text(413, PAYLOAD_TOO_LARGE)
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = f"status {status}"
    return _text(status, phrase)


# --------------------------------------------------------------------------------------------------
# The fake server
# --------------------------------------------------------------------------------------------------


class FakeOpenObserve:
    """An in-process OpenObserve ``_json`` ingestion endpoint on 127.0.0.1 for tests.

    Default behaviour follows openobserve.md section 2: Basic auth (two 401 shapes), gzip/deflate
    bodies, 415 for other encodings, 413 beyond ``payload_limit`` (after decompression, bounded), 400
    ``SerdeJsonError#`` for malformed JSON, and 200 with per-stream ``successful``/``failed`` counts where
    each record is validated (``_timestamp`` parsing and the 5 h / 24 h window) and normalized before it
    is stored. Scripted behaviours (:meth:`respond_status`, :meth:`reject_records`,
    :meth:`mismatch_counts`, :meth:`hang`) are consumed FIFO, one per ingestion request, whatever that
    request's outcome. Records survive :meth:`stop`/:meth:`restart` (they model the server's storage);
    :meth:`reset` clears them.
    """

    def __init__(
        self,
        user: str = "root@example.com",
        password: str = "Complexpass#123",
        port: int = 0,
        payload_limit: int = 200 * 1024 * 1024,
        *,
        allowed_upto_hours: float = 5,
        allowed_in_future_hours: float = 24,
    ) -> None:
        """Configure the fake; nothing listens until :meth:`start`.

        ``allowed_upto_hours`` / ``allowed_in_future_hours`` are ``ZO_INGEST_ALLOWED_UPTO`` /
        ``ZO_INGEST_ALLOWED_IN_FUTURE``; the error texts always quote the defaults, like the doc.
        """
        self.user = user
        self.password = password
        self.port = port
        self.payload_limit = payload_limit
        self.allowed_upto_hours = allowed_upto_hours
        self.allowed_in_future_hours = allowed_in_future_hours
        self.config: Dict[str, Any] = {
            "version": "v0.93.0-dev-fake",
            "commit_hash": "0000000000000000000000000000000000000000",
            "build_type": "opensource",
        }
        self._cond = threading.Condition(threading.RLock())
        self._stored: List[_Stored] = []
        self._log: List[ReceivedRequest] = []
        self._behaviours: collections.deque[_Behaviour] = collections.deque()
        self._held = False
        self._generation = 0
        self._max_records_per_request: Optional[int] = None
        self._connections_accepted = 0
        self._server_errors: List[str] = []
        self._httpd: Optional[_Server] = None
        self._serve_thread: Optional[threading.Thread] = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> FakeOpenObserve:
        """Bind 127.0.0.1:``port`` (0 = ephemeral) and serve in a daemon thread; returns ``self``."""
        with self._cond:
            if self._httpd is not None:
                raise RuntimeError(f"FakeOpenObserve already running on port {self.port}")
        httpd = self._bind(self.port)
        self.port = httpd.server_port
        thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.02},
            name=f"FakeOpenObserve:{self.port}",
            daemon=True,
        )
        with self._cond:
            self._httpd = httpd
            self._serve_thread = thread
        thread.start()
        return self

    def _bind(self, port: int) -> _Server:
        deadline = time.monotonic() + _JOIN_TIMEOUT
        while True:
            try:
                return _Server(port, self)
            except OSError as exc:
                # Only a fixed port can be transiently busy; give the kernel a bounded moment.
                if port == 0 or exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                    raise
                threading.Event().wait(0.05)

    def stop(self) -> None:
        """Stop listening and cut every open connection; later connections are refused.

        Requests parked by :meth:`hang` or :meth:`hold` are abandoned (no answer, nothing stored).
        Stored records and the request log are kept. Safe to call when not running.
        """
        with self._cond:
            httpd, thread = self._httpd, self._serve_thread
            if httpd is None:
                return
            self._httpd = None
            self._serve_thread = None
            httpd.stopped = True
            connections = dict(httpd.connections)
            self._cond.notify_all()
        httpd.shutdown()
        httpd.server_close()
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + _JOIN_TIMEOUT
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            self._cond.wait_for(lambda: not httpd.connections, max(0.0, deadline - time.monotonic()))

    def restart(self) -> None:
        """Listen again on the same port (stopping first if still running)."""
        self.stop()
        self.start()

    def __enter__(self) -> FakeOpenObserve:
        return self.start()

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        with self._cond:
            return self._httpd is not None

    @property
    def url(self) -> str:
        """Base URL, ``http://127.0.0.1:PORT`` (no trailing slash)."""
        return f"http://127.0.0.1:{self.port}"

    def ingest_url(self, org: str = "_meta", stream: str = "audit") -> str:
        """Full ``_json`` URL for ``org``/``stream``."""
        return f"{self.url}/api/{org}/{stream}/_json"

    @property
    def auth(self) -> Tuple[str, str]:
        """``(user, password)``, ready for ``requests``' ``auth=``."""
        return (self.user, self.password)

    # -- inspection ------------------------------------------------------------------------------

    @property
    def records(self) -> List[Record]:
        """Copies of every record stored (accepted), in order, across all orgs and streams."""
        with self._cond:
            return [dict(s.record) for s in self._stored]

    def records_for(self, org: str = "_meta", stream: str = "audit") -> List[Record]:
        """Copies of the records stored in ``org``/``stream`` (stream name formatted), in order."""
        name = format_stream_name(stream)
        with self._cond:
            return [dict(s.record) for s in self._stored if s.org == org and s.stream == name]

    @property
    def requests_log(self) -> List[ReceivedRequest]:
        """Every request received, in arrival order (the live objects; see :class:`ReceivedRequest`)."""
        with self._cond:
            return list(self._log)

    def ingestion_requests(self) -> List[ReceivedRequest]:
        """The ``_json`` requests of :attr:`requests_log`."""
        with self._cond:
            return [r for r in self._log if r.route == "ingest"]

    @property
    def connections_accepted(self) -> int:
        """TCP connections accepted so far (keep-alive reuse keeps this low)."""
        with self._cond:
            return self._connections_accepted

    @property
    def server_errors(self) -> List[str]:
        """Tracebacks of unexpected exceptions in handlers (should stay empty)."""
        with self._cond:
            return list(self._server_errors)

    @property
    def pending_behaviours(self) -> int:
        """Scripted behaviours not yet consumed."""
        with self._cond:
            return len(self._behaviours)

    # -- waiting ---------------------------------------------------------------------------------

    def wait_until(
        self, predicate: Callable[[], bool], timeout: float = 10.0, description: str = "condition"
    ) -> None:
        """Wait until ``predicate()`` is true (evaluated under the server lock after every change).

        Raises :class:`AssertionError` naming ``description`` and the server's state on timeout.
        """
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {description}\n{self._state_report()}"
                )

    def wait_for_records(
        self, n: int, timeout: float = 10.0, org: str = "_meta", stream: str = "audit"
    ) -> List[Record]:
        """Wait until at least ``n`` records are stored in ``org``/``stream``; return them all."""
        name = format_stream_name(stream)

        def count() -> int:
            return sum(1 for s in self._stored if s.org == org and s.stream == name)

        with self._cond:
            if not self._cond.wait_for(lambda: count() >= n, timeout):
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {n} stored records in {org}/{name}; "
                    f"have {count()}\n{self._state_report()}"
                )
            return self.records_for(org, stream)

    def wait_for_requests(
        self, n: int, timeout: float = 10.0, route: Optional[str] = "ingest"
    ) -> List[ReceivedRequest]:
        """Wait until at least ``n`` requests of ``route`` (``None``: any) were received; return them all.

        Returns only once no logged request is in the transient ``"processing"`` state, so the
        ``status`` of every answered request is final; requests parked by :meth:`hold` or :meth:`hang`
        are returned with ``status`` ``None`` and ``state`` ``"held"``/``"hanging"``.
        """

        def selected() -> List[ReceivedRequest]:
            return [r for r in self._log if route is None or r.route == route]

        def ready() -> bool:
            reqs = selected()
            return len(reqs) >= n and all(r.state != "processing" for r in reqs)

        with self._cond:
            if not self._cond.wait_for(ready, timeout):
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {n} {route or 'any'} requests; "
                    f"have {len(selected())}\n{self._state_report()}"
                )
            return selected()

    def _state_report(self) -> str:
        lines = [
            f"  stored records: {len(self._stored)}; pending behaviours: "
            f"{[b.describe() for b in self._behaviours]}; held: {self._held}"
        ]
        lines.append(f"  requests ({len(self._log)}):")
        lines.extend(f"    {r.summary()}" for r in self._log[-20:])
        if self._server_errors:
            lines.append("  server errors:")
            lines.extend(self._server_errors[-3:])
        return "\n".join(lines)

    # -- scripting -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Clear records, the log, scripted behaviours, ``max_records_per_request`` and the hold.

        Requests parked by :meth:`hang`/:meth:`hold` are abandoned (no answer, nothing stored), and a
        request already being processed when reset() runs stores nothing.
        """
        with self._cond:
            self._generation += 1
            self._stored.clear()
            self._log.clear()
            self._behaviours.clear()
            self._held = False
            self._max_records_per_request = None
            self._server_errors.clear()
            self._cond.notify_all()

    def _enqueue(self, behaviour: _Behaviour, times: int) -> None:
        if times < 0:
            raise ValueError("times must be >= 0")
        with self._cond:
            for _ in range(times):
                self._behaviours.append(dataclasses.replace(behaviour))
            self._cond.notify_all()

    def respond_status(
        self, status: int, times: int = 1, retry_after: Optional[str] = None, body: Optional[str] = None
    ) -> None:
        """Answer the next ``times`` ingestion requests with ``status`` (nothing stored, no auth check).

        ``body`` defaults to what the server (or a proxy) would send for that status; a body that parses
        as JSON is sent as ``application/json``, otherwise as ``text/plain``. ``retry_after`` adds a
        ``Retry-After`` header.
        """
        self._enqueue(_Behaviour("status", status=status, retry_after=retry_after, body=body), times)

    def reject_records(self, failed: int, error: str = TOO_OLD_ERROR, times: int = 1) -> None:
        """Answer 200 but fail (do not store) the LAST ``failed`` records of the next ``times`` requests."""
        if failed < 0:
            raise ValueError("failed must be >= 0")
        self._enqueue(_Behaviour("reject", failed=failed, error=error), times)

    def mismatch_counts(self, drop: int, times: int = 1) -> None:
        """Answer 200 but silently lose the last ``drop`` good records: ``successful`` excludes them and
        ``failed`` does not include them, so the counts do not add up."""
        if drop < 0:
            raise ValueError("drop must be >= 0")
        self._enqueue(_Behaviour("mismatch", drop=drop), times)

    def hang(self, seconds: float, times: int = 1) -> None:
        """Park the next ``times`` requests for ``seconds`` before processing them normally.

        :meth:`stop` or :meth:`reset` cut the wait short; the request is then abandoned.
        """
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        self._enqueue(_Behaviour("hang", seconds=seconds), times)

    @property
    def max_records_per_request(self) -> Optional[int]:
        """When set, an ingestion request with more records gets 413 (plain text) and nothing is stored."""
        with self._cond:
            return self._max_records_per_request

    @max_records_per_request.setter
    def max_records_per_request(self, value: Optional[int]) -> None:
        with self._cond:
            self._max_records_per_request = value

    def hold(self) -> None:
        """Park every ingestion request (state ``"held"``) until :meth:`release`."""
        with self._cond:
            self._held = True
            self._cond.notify_all()

    def release(self) -> None:
        """Let held ingestion requests proceed."""
        with self._cond:
            self._held = False
            self._cond.notify_all()

    @property
    def held(self) -> bool:
        """Whether ingestion requests are currently being held."""
        with self._cond:
            return self._held

    # -- request handling (called from handler threads) ------------------------------------------

    def _record_server_error(self, text: str) -> None:
        with self._cond:
            self._server_errors.append(text)
            self._cond.notify_all()

    def _log_request(self, entry: ReceivedRequest) -> None:
        with self._cond:
            self._log.append(entry)
            self._cond.notify_all()

    def _finish_request(self, entry: ReceivedRequest, response: _Response) -> None:
        with self._cond:
            entry.status = response.status
            entry.response_headers = dict(response.headers)
            if response.content_type:
                entry.response_headers["Content-Type"] = response.content_type
            entry.response_body = response.body
            entry.state = "answered"
            entry.answered_at = time.monotonic()
            self._cond.notify_all()

    def _abandon(self, entry: ReceivedRequest) -> _Abandon:
        entry.state = "abandoned"
        self._cond.notify_all()
        return _Abandon()

    def _check_auth(self, headers: Dict[str, str]) -> Optional[_Response]:
        header = headers.get("authorization")
        if header is None:
            return _json_response(401, {"code": 401, "message": UNAUTHORIZED})
        bad = _text(401, UNAUTHORIZED, {"WWW-Authenticate": 'Basic realm="openobserve"'})
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return bad
        try:
            decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return bad
        user, sep, password = decoded.partition(":")
        if not sep or user != self.user or password != self.password:
            return bad
        return None

    def _handle_ingest(self, entry: ReceivedRequest, httpd: _Server) -> _Response:
        # Decode first (best effort) so the log shows what the client sent even when we refuse it.
        decode_failure: Optional[_DecodeError] = None
        try:
            if entry.body_size > self.payload_limit:
                raise _DecodeError(413, PAYLOAD_TOO_LARGE)
            data = _decode_body(entry.body, entry.headers.get("content-encoding", ""), self.payload_limit)
            entry.records = _parse_records(data)
        except _DecodeError as exc:
            decode_failure = exc
            entry.decode_error = exc.message

        with self._cond:
            generation = self._generation
            self._log.append(entry)
            behaviour = self._behaviours.popleft() if self._behaviours else None
            if behaviour is not None:
                entry.behaviour = behaviour.describe()

            def aborted() -> bool:
                return httpd.stopped or self._generation != generation

            if self._held:
                entry.state = "held"
                self._cond.notify_all()
                self._cond.wait_for(lambda: not self._held or aborted())
            if aborted():
                raise self._abandon(entry)
            if behaviour is not None and behaviour.kind == "hang":
                entry.state = "hanging"
                self._cond.notify_all()
                self._cond.wait_for(aborted, behaviour.seconds)
                if aborted():
                    raise self._abandon(entry)
            entry.state = "processing"
            self._cond.notify_all()
            max_records = self._max_records_per_request

        if behaviour is not None and behaviour.kind == "status":
            return self._scripted_response(behaviour)
        denied = self._check_auth(entry.headers)
        if denied is not None:
            return denied
        if decode_failure is not None:
            if decode_failure.status == 400 and decode_failure.message.startswith("SerdeJsonError#"):
                return _json_response(400, {"code": 400, "message": decode_failure.message})
            return _text(decode_failure.status, decode_failure.message)
        records = entry.records or []
        if max_records is not None and len(records) > max_records:
            return _text(413, f"{PAYLOAD_TOO_LARGE} {len(records)} records > {max_records} per request")

        org, stream = entry.org or "", format_stream_name(entry.stream or "")
        now_us = time.time_ns() // 1000
        min_ts = now_us - int(self.allowed_upto_hours * HOUR_MICROS)
        max_ts = now_us + int(self.allowed_in_future_hours * HOUR_MICROS)
        forced_failures = behaviour.failed if behaviour is not None and behaviour.kind == "reject" else 0
        first_forced = len(records) - forced_failures
        good: List[Record] = []
        failed = 0
        last_error: Optional[str] = None
        for index, raw in enumerate(records):
            if index >= first_forced and behaviour is not None:
                failed += 1
                last_error = behaviour.error
                continue
            stored, error = self._validate(raw, now_us, min_ts, max_ts)
            if stored is None:
                failed += 1
                last_error = error
            else:
                good.append(stored)
        if behaviour is not None and behaviour.kind == "mismatch" and behaviour.drop:
            good = good[: max(0, len(good) - behaviour.drop)]

        status: Record = {"name": stream, "successful": len(good), "failed": failed}
        if failed > 0:
            status["error"] = last_error or ""
        with self._cond:
            if httpd.stopped or self._generation != generation:
                raise self._abandon(entry)
            self._stored.extend(_Stored(org, stream, r) for r in good)
            self._cond.notify_all()
        return _json_response(200, {"code": 200, "status": [status]})

    @staticmethod
    def _validate(raw: Any, now_us: int, min_ts: int, max_ts: int) -> Tuple[Optional[Record], str]:
        if not isinstance(raw, dict):
            return None, "Invalid json: not an object"
        record = normalize_record(raw)
        try:
            ts = parse_timestamp_micros(record["_timestamp"], now_us) if "_timestamp" in record else now_us
        except ValueError as exc:
            return None, str(exc)
        if ts < min_ts:
            return None, TOO_OLD_ERROR
        if ts > max_ts:
            return None, TOO_FAR_ERROR
        record["_timestamp"] = ts
        return record, ""

    @staticmethod
    def _scripted_response(behaviour: _Behaviour) -> _Response:
        extra = {"Retry-After": behaviour.retry_after} if behaviour.retry_after is not None else {}
        if behaviour.body is None:
            response = _default_scripted_body(behaviour.status)
            response.headers.update(extra)
            return response
        try:
            json.loads(behaviour.body)
        except ValueError:
            return _text(behaviour.status, behaviour.body, extra)
        return _Response(behaviour.status, behaviour.body.encode("utf-8"), "application/json", extra)

    def _handle_search(self, entry: ReceivedRequest) -> _Response:
        denied = self._check_auth(entry.headers)
        if denied is not None:
            return denied
        try:
            request = json.loads(entry.body.decode("utf-8"))
            query = request["query"]
            sql = str(query["sql"])
            start = int(query.get("start_time", 0))
            end = int(query.get("end_time", 2**63 - 1))
            offset = int(query.get("from", 0))
            size = int(query.get("size", 100))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError) as exc:
            return _json_response(400, {"code": 400, "message": f"Invalid search request: {exc!r}"})
        match = _FROM_RE.search(sql)
        if match is None:
            return _json_response(400, {"code": 400, "message": "Search SQL has no FROM clause"})
        stream = format_stream_name(next(g for g in match.groups() if g is not None))
        with self._cond:
            hits = [
                dict(s.record)
                for s in self._stored
                if s.org == entry.org and s.stream == stream and start <= s.record["_timestamp"] < end
            ]
        hits.sort(key=lambda r: int(r["_timestamp"]))
        total = len(hits)
        page = hits[offset:] if size < 0 else hits[offset : offset + size]
        return _json_response(
            200, {"took": 0, "hits": page, "total": total, "from": offset, "size": size, "scan_size": 0}
        )
