"""Sinks: where a batch of audit records goes, and what exactly happened to each record.

``HttpSink`` writes to OpenObserve's ``_json`` ingestion API; ``FileSink`` appends JSON lines to a local file.
Both answer every batch with a :class:`DeliveryReport` that accounts for every record: delivered, rejected
by the server, or lost (with the reason), so the caller can count and log each loss.
"""

from __future__ import annotations

import base64
import email.utils
import gzip
import ipaddress
import json
import logging
import os
import random
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence
from urllib.parse import urlsplit

import requests

from .config import O2AuditConfig
from .record import AuditRecord

__all__ = ["DeliveryReport", "FileSink", "HttpSink", "Sink", "make_sink"]

_logger = logging.getLogger("otel_o2audit")

_RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
_MAX_BACKOFF = 30.0
_JITTER = 0.2
_MAX_SERVER_TEXT = 500


@dataclass(frozen=True)
class DeliveryReport:
    """What became of one batch. ``delivered + rejected + lost == sent`` always holds."""

    sent: int
    delivered: int = 0
    rejected: int = 0
    lost: int = 0
    attempts: int = 0
    retries: int = 0
    reason: str = ""
    #: The loss may be undone by trying again later (outage, throttling, bad credentials fixed by an
    #: operator); a durable spool then keeps the batch instead of losing it.
    retry_later: bool = False

    @property
    def ok(self) -> bool:
        """True when every record was acknowledged as stored."""
        return self.delivered == self.sent

    def __add__(self, other: DeliveryReport) -> DeliveryReport:
        reason = "; ".join(r for r in (self.reason, other.reason) if r)
        return DeliveryReport(
            sent=self.sent + other.sent,
            delivered=self.delivered + other.delivered,
            rejected=self.rejected + other.rejected,
            lost=self.lost + other.lost,
            attempts=self.attempts + other.attempts,
            retries=self.retries + other.retries,
            reason=reason,
            retry_later=self.retry_later or other.retry_later,
        )


class Sink(Protocol):
    """Where batches go. Implementations are thread-safe and never raise from :meth:`send`."""

    def send(self, records: Sequence[AuditRecord], deadline: float) -> DeliveryReport:
        """Deliver ``records``, retrying until ``deadline`` (a ``time.monotonic()`` value) at the latest."""

    def close(self) -> None:
        """Interrupt any backoff in progress and release resources; later sends fail fast."""

    def describe(self) -> str:
        """Where the records go, for logs (never with credentials)."""


class _StaticAuth(requests.auth.AuthBase):
    """Sets a precomputed Authorization header; its repr never shows it."""

    def __init__(self, header: str) -> None:
        self._header = header

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = self._header
        return request

    def __repr__(self) -> str:
        return "_StaticAuth('***')"


def _encode(records: Sequence[AuditRecord]) -> bytes:
    return json.dumps(list(records), separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")


def _server_text(response: requests.Response) -> str:
    try:
        text = response.text
    except Exception:  # noqa: BLE001 - a body we cannot decode is still an answer
        return ""
    return " ".join(text.split())[:_MAX_SERVER_TEXT]


def _retry_after(response: requests.Response) -> Optional[float]:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _register_fork_reset(method: Callable[[], None]) -> None:
    ref = weakref.WeakMethod(method)

    def reset() -> None:
        bound = ref()
        if bound is not None:
            bound()

    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=reset)


class HttpSink:
    """POSTs gzip-compressed JSON arrays to ``/api/{org}/{stream}/_json`` with Basic auth.

    One ``requests.Session`` per process (re-created after ``fork``); redirects are not followed (a redirect
    could carry credentials elsewhere); retries 429/502/503/504 and connection errors with exponential
    backoff and jitter, honouring ``Retry-After``, inside the caller's deadline; splits a batch on 413.
    """

    def __init__(self, config: O2AuditConfig) -> None:
        url = config.ingest_url()
        if url is None or config.user is None or config.password is None:
            raise ValueError("HttpSink needs an http(s) endpoint with user and password")
        self._url = url
        token = base64.b64encode(f"{config.user}:{config.password.reveal()}".encode()).decode("ascii")
        # Passed as ``auth=`` on every request: with no auth object, requests would let a ~/.netrc entry
        # replace our Authorization header.
        self._auth = _StaticAuth(f"Basic {token}")
        self._headers = {
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            "User-Agent": "otel-o2audit",
        }
        self._timeout = config.timeout
        self._initial_backoff = config.retry_initial_backoff
        # TLS verification is always on; a private CA and a client certificate (mTLS) are optional.
        self._verify: Any = config.ca_bundle or True
        self._cert: Any = None
        if config.client_cert:
            self._cert = (config.client_cert, config.client_key) if config.client_key else config.client_cert
        _warn_if_plain_http(url)
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._session: Optional[requests.Session] = None
        _register_fork_reset(self._after_fork)

    def __repr__(self) -> str:
        return f"HttpSink({self._url!r})"

    def describe(self) -> str:
        """The ingestion URL (it carries no credentials)."""
        return self._url

    def _after_fork(self) -> None:
        # The parent's pooled connections must not be shared with the child.
        self._lock = threading.Lock()
        self._session = None

    def _get_session(self) -> requests.Session:
        with self._lock:
            if self._session is None:
                self._session = requests.Session()
            return self._session

    def close(self) -> None:
        """Interrupt a backoff sleep and close the connection pool."""
        self._closed.set()
        with self._lock:
            session, self._session = self._session, None
        if session is not None:
            session.close()

    def send(self, records: Sequence[AuditRecord], deadline: float) -> DeliveryReport:
        """Deliver ``records``; every outcome is in the returned report, nothing raises."""
        if not records:
            return DeliveryReport(sent=0)
        try:
            return self._send(records, deadline)
        except Exception as exc:  # noqa: BLE001 - a bug here must cost records, never the worker
            # Only the type: an exception's repr may quote record content.
            _logger.error("otel-o2audit: unexpected %s while sending %d records", type(exc).__name__, len(records))
            return DeliveryReport(sent=len(records), lost=len(records), reason=f"internal error: {type(exc).__name__}")

    def _send(self, records: Sequence[AuditRecord], deadline: float) -> DeliveryReport:
        count = len(records)
        body = gzip.compress(_encode(records), compresslevel=5)
        attempts = 0
        last_error = ""
        mismatch_retried = False
        while True:
            if self._closed.is_set():
                return DeliveryReport(count, lost=count, attempts=attempts, retries=max(0, attempts - 1),
                                      reason=f"sink closed ({last_error or 'shutdown'})", retry_later=True)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return DeliveryReport(count, lost=count, attempts=attempts, retries=max(0, attempts - 1),
                                      reason=f"no time left to send ({last_error or 'deadline passed'})",
                                      retry_later=True)
            attempts += 1
            timeout = min(self._timeout, remaining)
            retry_after: Optional[float] = None
            try:
                # verify/cert per request: requests would otherwise let REQUESTS_CA_BUNDLE override them.
                response = self._get_session().post(
                    self._url, data=body, headers=self._headers, auth=self._auth, timeout=timeout,
                    allow_redirects=False, verify=self._verify, cert=self._cert,
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                last_error = f"{type(exc).__name__}: {_short(exc)}"
            except requests.RequestException as exc:
                return DeliveryReport(count, lost=count, attempts=attempts, retries=attempts - 1,
                                      reason=f"request failed: {type(exc).__name__}: {_short(exc)}")
            else:
                status = response.status_code
                if status == 200:
                    report = _judge_200(response, count, attempts)
                    if report.lost and not report.rejected and not mismatch_retried:
                        # Counts that do not add up: a silent server-side drop. One more try, accepting
                        # that the records it did store arrive twice (event_id de-duplicates them).
                        mismatch_retried = True
                        _logger.warning("otel-o2audit: %s; sending the batch once more", report.reason)
                        continue
                    return report
                if status == 413 and count > 1:
                    half = count // 2
                    _logger.info("otel-o2audit: 413 for %d records, splitting the batch", count)
                    first = self._send(records[:half], deadline)
                    second = self._send(records[half:], deadline)
                    split = first + second
                    return DeliveryReport(split.sent, split.delivered, split.rejected, split.lost,
                                          split.attempts + attempts, split.retries + attempts - 1, split.reason,
                                          retry_later=split.retry_later)
                text = _server_text(response)
                if status == 413:
                    return DeliveryReport(count, rejected=count, attempts=attempts, retries=attempts - 1,
                                          reason=f"HTTP 413: record larger than the server's payload limit {text}")
                if status not in _RETRYABLE_STATUS:
                    # 401/403/404 are configuration problems an operator can fix: worth keeping on disk.
                    return DeliveryReport(count, lost=count, attempts=attempts, retries=attempts - 1,
                                          reason=f"HTTP {status} (not retryable): {text}",
                                          retry_later=status in (401, 403, 404))
                last_error = f"HTTP {status}: {text}"
                retry_after = _retry_after(response)
            backoff = self._initial_backoff * (2 ** min(attempts - 1, 30))
            backoff *= 1 + random.uniform(-_JITTER, _JITTER)  # noqa: S311 - jitter, not cryptography
            backoff = min(_MAX_BACKOFF, backoff)  # the cap applies after the jitter
            if retry_after is not None:
                backoff = max(backoff, min(retry_after, _MAX_BACKOFF))
            if time.monotonic() + backoff >= deadline:
                return DeliveryReport(count, lost=count, attempts=attempts, retries=attempts - 1,
                                      reason=f"retry window exhausted after {attempts} attempt(s): {last_error}",
                                      retry_later=True)
            _logger.info("otel-o2audit: attempt %d for %d records failed (%s); retrying in %.2fs",
                         attempts, count, last_error, backoff)
            if self._closed.wait(backoff):
                return DeliveryReport(count, lost=count, attempts=attempts, retries=attempts - 1,
                                      reason=f"shut down during backoff ({last_error})", retry_later=True)


_warned_plain_http: set[str] = set()


def _warn_if_plain_http(url: str) -> None:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "http" or host in _warned_plain_http:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        _warned_plain_http.add(host)
        _logger.warning("otel-o2audit: O2_AUDIT_ENDPOINT uses plain http to %s: credentials and audit records "
                        "cross the network unencrypted; use https", host)


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:_MAX_SERVER_TEXT]


def _judge_200(response: requests.Response, count: int, attempts: int) -> DeliveryReport:
    retries = attempts - 1
    try:
        payload = response.json()
        entries = payload.get("status") or []
        successful = sum(int(e.get("successful", 0)) for e in entries)
        failed = sum(int(e.get("failed", 0)) for e in entries)
        errors = [str(e["error"]) for e in entries if e.get("error")]
    except (ValueError, TypeError, AttributeError):
        return DeliveryReport(count, lost=count, attempts=attempts, retries=retries,
                              reason=f"HTTP 200 with an unreadable body: {_server_text(response)}")
    error_text = "; ".join(errors)[:_MAX_SERVER_TEXT]
    if successful == count and failed == 0:
        return DeliveryReport(count, delivered=count, attempts=attempts, retries=retries)
    if successful + failed == count:
        # OpenObserve stored the others: re-sending any part would duplicate them.
        return DeliveryReport(count, delivered=successful, rejected=failed, attempts=attempts, retries=retries,
                              reason=f"server rejected {failed} of {count} records: {error_text}")
    delivered = min(successful, count)
    rejected = min(failed, count - delivered)
    return DeliveryReport(count, delivered=delivered, rejected=rejected, lost=count - delivered - rejected,
                          attempts=attempts, retries=retries,
                          reason=f"counts do not add up: sent {count}, successful {successful}, failed {failed}"
                          + (f": {error_text}" if error_text else ""))


class FileSink:
    """Appends records as JSON lines to a local file: the local sink and the demo's default.

    Each batch is written with one ``write`` on an ``O_APPEND`` descriptor under an exclusive ``flock``, so
    threads and processes sharing the file never interleave lines; the file is fsynced after each batch.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()
        _register_fork_reset(self._after_fork)
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise PermissionError(f"cannot write to {directory}")

    def __repr__(self) -> str:
        return f"FileSink({self._path!r})"

    def describe(self) -> str:
        """The file's path."""
        return self._path

    def _after_fork(self) -> None:
        # A fork while another thread held the lock would leave the child's copy locked forever.
        self._lock = threading.Lock()

    def close(self) -> None:
        """Nothing to release: the file is opened per batch."""

    def send(self, records: Sequence[AuditRecord], deadline: float) -> DeliveryReport:
        """Append ``records``; an I/O error loses the batch and says why."""
        count = len(records)
        if not count:
            return DeliveryReport(sent=0)
        try:
            data = b"".join(
                json.dumps(r, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8") + b"\n"
                for r in records
            )
        except (TypeError, ValueError) as exc:
            return DeliveryReport(count, lost=count, attempts=0, reason=f"cannot encode: {type(exc).__name__}")
        try:
            with self._lock:
                fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    _lock_file(fd)
                    view = memoryview(data)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            return DeliveryReport(count, lost=count, attempts=1, reason=f"cannot append to {self._path}: {exc}")
        return DeliveryReport(count, delivered=count, attempts=1)


def _lock_file(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: O_APPEND alone
        return
    fcntl.flock(fd, fcntl.LOCK_EX)  # released by close()


def make_sink(config: O2AuditConfig) -> Sink:
    """The sink for ``config.endpoint``."""
    path = config.file_path()
    if path is not None:
        return FileSink(path)
    return HttpSink(config)
