"""The durable spool: an append-only on-disk log of audit records not yet acknowledged by OpenObserve.

Layout of ``O2_AUDIT_SPOOL_DIR``::

    seg-<host>-<pid>-<ns>-<n>.log    segments: one line per record, "<crc32 hex> <json>\\n"
    seg-<...>.ack                    byte offset up to which the segment's records are settled
    expired/<date>-<host>-<pid>.jsonl   records too old for OpenObserve's ingestion window (JSON lines)
    rejected/<date>-<host>-<pid>.jsonl  batches OpenObserve partly rejected, kept for inspection

Every captured record is appended to the process's live segment by the collector thread before anything
is sent, so a crash of the application loses only what the collector had not written yet (it writes at
least every 0.25 s). Segments are fsynced every ``O2_AUDIT_SPOOL_FSYNC_INTERVAL`` seconds (0 = after every
write), which bounds what a crash of the *machine* can lose. A record leaves the spool only when its
batch is settled: acknowledged by OpenObserve, rejected by it (kept under ``rejected/``), or expired.

Ownership: a process holds an exclusive ``flock`` on each segment it writes or replays. A segment whose
lock can be taken belongs to a dead process (a SIGKILLed worker, a previous run) and is adopted: replayed in
order, then deleted. Locks die with their process, so no two live processes ever send the same file. A
torn last line (a write cut by a crash) fails its checksum or lacks its newline: it is skipped, counted as
lost and logged, and never blocks the rest of the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import zlib
from collections import deque
from typing import Deque, List, Optional, Sequence, Tuple

from .record import AuditRecord
from .stats import COUNTERS
from .store import Batch, Sealer

__all__ = ["SpoolStore"]

_logger = logging.getLogger("otel_o2audit")

_SEGMENT_BYTES = 8 * 1024 * 1024
_READ_CHUNK = 256 * 1024
_ADOPT_EVERY = 10.0
_COUNTED = b"-"  # a line starting with this is a corrupt line already counted as lost


try:  # pragma: no cover - POSIX only; without flock a spool cannot be shared safely
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True

except ImportError:  # pragma: no cover

    def _try_lock(fd: int) -> bool:
        return True


class _Segment:
    __slots__ = ("acked", "adopted", "bad", "count", "fd", "live", "name", "path", "read_pos", "size")

    def __init__(self, path: str, fd: int, size: int, acked: int, live: bool) -> None:
        self.path = path
        self.name = os.path.basename(path)
        self.fd = fd
        self.size = size
        self.acked = acked
        self.read_pos = acked
        self.live = live
        self.adopted = False  # written by another (dead) process or an earlier run: replayed records
        self.count = 0  # records not yet settled (approximate for adopted segments until read)
        self.bad: set[int] = set()  # offsets of corrupt lines already counted


def _creation_key(name: str) -> Tuple[int, int]:
    """(creation ns, sequence) from ``seg-<host>-<pid>-<ns>-<n>.log``; host names may contain dashes."""
    parts = name[: -len(".log")].rsplit("-", 3)
    try:
        return int(parts[2]), int(parts[3])
    except (IndexError, ValueError):
        return 0, 0


def _encode_line(record: AuditRecord) -> bytes:
    body = json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _decode_line(line: bytes) -> Optional[AuditRecord]:
    if len(line) < 10 or line[8:9] != b" ":
        return None
    body = line[9:]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        record = json.loads(body)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class SpoolStore:
    """A :class:`~otel_o2audit.store.Store` on disk; see the module docstring for the guarantees."""

    durable = True

    def __init__(self, directory: str, *, max_bytes: int, fsync_interval: float,
                 sealer: Optional[Sealer] = None) -> None:
        self._dir = directory
        self._max_bytes = max_bytes
        self._fsync_interval = fsync_interval
        self._sealer = sealer
        for sub in ("", "expired", "rejected"):
            os.makedirs(os.path.join(directory, sub), exist_ok=True)
        self._lock = threading.RLock()
        self._segments: Deque[_Segment] = deque()
        self._live: Optional[_Segment] = None
        self._dirty_since: Optional[float] = None
        self._last_adopt = 0.0
        self._bytes_elsewhere = 0  # other processes' segments, refreshed on each adoption scan
        self._side_bytes = self._scan_side_bytes()  # expired/ and rejected/ count against the budget too
        self._sequence = 0
        self._closed = False
        self._open_live()
        self._adopt()

    def __repr__(self) -> str:
        return f"SpoolStore({self._dir!r})"

    # ------------------------------------------------------------------ segments
    def _open_live(self) -> None:
        self._sequence += 1
        name = f"seg-{socket.gethostname()}-{os.getpid()}-{time.time_ns()}-{self._sequence}"
        temp = os.path.join(self._dir, f".{name}.new")
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        _try_lock(fd)
        # Locked before it is visible under its scanned name, so nobody can adopt a live segment.
        path = os.path.join(self._dir, f"{name}.log")
        os.rename(temp, path)
        segment = _Segment(path, fd, 0, 0, live=True)
        self._segments.append(segment)
        self._live = segment

    def _ack_path(self, segment: _Segment) -> str:
        return segment.path[: -len(".log")] + ".ack"

    def _write_ack(self, segment: _Segment) -> None:
        path = self._ack_path(segment)
        temp = f"{path}.{os.getpid()}.tmp"
        with open(temp, "w", encoding="ascii") as handle:
            handle.write(str(segment.acked))
        os.replace(temp, path)

    def _read_ack(self, path: str) -> int:
        try:
            with open(path[: -len(".log")] + ".ack", encoding="ascii") as handle:
                return max(0, int(handle.read().strip() or 0))
        except (OSError, ValueError):
            return 0

    def _remove(self, segment: _Segment) -> None:
        # Unlink before releasing the lock: whoever locks the file afterwards finds it gone and skips it.
        for path in (segment.path, self._ack_path(segment)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        os.close(segment.fd)

    def _adopt(self) -> None:
        self._last_adopt = time.monotonic()
        mine = {s.path for s in self._segments}
        elsewhere = 0
        try:
            names = sorted(os.listdir(self._dir))
        except OSError:
            return
        present = set(names)
        candidates = []
        for name in names:
            path = os.path.join(self._dir, name)
            if name.endswith(".new") or (name.endswith(".ack") and name[: -len(".ack")] + ".log" not in present):
                self._remove_orphan(path)
                continue
            if not (name.startswith("seg-") and name.endswith(".log")) or path in mine:
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue
            if not _try_lock(fd):
                try:
                    elsewhere += os.fstat(fd).st_size
                finally:
                    os.close(fd)
                continue
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except OSError:
                same = False
            if not same:
                os.close(fd)
                continue
            candidates.append((_creation_key(name), path, fd))
        self._bytes_elsewhere = elsewhere
        self._side_bytes = self._scan_side_bytes()
        # Oldest first: by creation time in the name, then by name.
        for _, path, fd in sorted(candidates, key=lambda c: (c[0], c[1])):
            size = os.fstat(fd).st_size
            acked = min(self._read_ack(path), size)
            segment = _Segment(path, fd, size, acked, live=False)
            segment.adopted = True
            segment.count = self._count_lines(segment)
            if segment.count == 0 and acked >= size:
                self._remove(segment)
                continue
            _logger.info("otel-o2audit: adopting spool file %s with about %d unsent records", segment.name,
                         segment.count)
            # Adopted files go before the live segment: older records are replayed first.
            live = self._segments.pop() if self._segments and self._segments[-1].live else None
            self._segments.append(segment)
            if live is not None:
                self._segments.append(live)

    def _remove_orphan(self, path: str) -> None:
        # A ".new" file whose creator died before renaming it, or an ".ack" whose segment is gone. A ".new"
        # file that is still being created is locked by its creator, so it is left alone.
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            if path.endswith(".new") and not _try_lock(fd):
                return
            with contextlib.suppress(OSError):
                os.unlink(path)
        finally:
            os.close(fd)

    def _count_lines(self, segment: _Segment) -> int:
        count = 0
        offset = segment.acked
        while offset < segment.size:
            chunk = os.pread(segment.fd, _READ_CHUNK, offset)
            if not chunk:
                break
            count += chunk.count(b"\n")
            offset += len(chunk)
        return count

    def _total_bytes(self) -> int:
        return self._bytes_elsewhere + self._side_bytes + sum(s.size - s.acked for s in self._segments)

    def _scan_side_bytes(self) -> int:
        total = 0
        for folder in ("expired", "rejected"):
            with contextlib.suppress(OSError):
                for entry in os.scandir(os.path.join(self._dir, folder)):
                    with contextlib.suppress(OSError):
                        total += entry.stat().st_size
        return total

    # ------------------------------------------------------------------ Store interface
    def add(self, records: Sequence[AuditRecord]) -> int:
        """Seal and append ``records`` to the live segment; what exceeds the disk budget is lost (counted)."""
        if not records:
            return 0
        with self._lock:
            if self._closed or self._live is None:
                COUNTERS.add("lost", len(records))
                return 0
            lines = []
            budget = self._max_bytes - self._total_bytes()
            over = 0
            for record in records:
                line = _encode_line(self._sealer(record) if self._sealer else record)
                if len(line) > budget:
                    over += 1
                    continue
                budget -= len(line)
                lines.append(line)
            if over:
                COUNTERS.add("lost", over)
                _logger.error("otel-o2audit: %d audit records LOST: the spool is full (O2_AUDIT_SPOOL_MAX_BYTES=%d)",
                              over, self._max_bytes)
            if not lines:
                return 0
            data = b"".join(lines)
            live = self._live
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(live.fd, view):]
            except OSError as exc:
                # Cut a partial write back off, so the file holds whole lines and matches our size.
                with contextlib.suppress(OSError):
                    os.ftruncate(live.fd, live.size)
                COUNTERS.add("lost", len(lines))
                _logger.error("otel-o2audit: %d audit records LOST: cannot write the spool: %s", len(lines), exc)
                return 0
            live.size += len(data)
            live.count += len(lines)
            if self._fsync_interval <= 0:
                os.fsync(live.fd)
            elif self._dirty_since is None:
                self._dirty_since = time.monotonic()
            if live.size >= _SEGMENT_BYTES:
                self._sync()
                live.live = False
                self._open_live()
            return len(lines)

    def pending(self) -> int:
        """Records not yet taken (approximate for adopted files until they are read)."""
        with self._lock:
            return sum(s.count for s in self._segments)

    def oldest(self) -> Optional[int]:
        """0 while a replay backlog exists (send it now), else the live segment's next record's time."""
        with self._lock:
            for segment in self._segments:
                if segment.read_pos < segment.size:
                    if segment.adopted:
                        return 0
                    records, _ = self._read_lines(segment, segment.read_pos, 1)
                    if records:
                        return int(records[0].get("_timestamp", 0))
                    return 0
            return None

    def _read_lines(self, segment: _Segment, start: int, limit: int) -> Tuple[List[AuditRecord], int]:
        """Up to ``limit`` decoded records from ``start``, and the offset just after the last line consumed.

        Corrupt lines are consumed and counted once (see :meth:`_corrupt`); a torn last line without its
        newline is handled only in a file no process writes any more.
        """
        out: List[AuditRecord] = []
        offset = start  # file offset of buffer[pos]
        buffer = b""
        pos = 0
        while len(out) < limit and offset + len(buffer) - pos < segment.size:
            chunk = os.pread(segment.fd, _READ_CHUNK, offset + len(buffer) - pos)
            if not chunk:
                break
            buffer = buffer[pos:] + chunk
            pos = 0
            while len(out) < limit:
                end = buffer.find(b"\n", pos)
                if end < 0:
                    break
                line = buffer[pos:end]
                line_start, offset = offset, offset + end + 1 - pos
                pos = end + 1
                if line.startswith(_COUNTED):
                    continue  # a corrupt line an earlier reader already counted
                record = _decode_line(line)
                if record is None:
                    self._corrupt(segment, line_start, offset)
                    continue
                out.append(record)
        rest = len(buffer) - pos
        if len(out) < limit and rest and buffer.find(b"\n", pos) < 0 and offset + rest >= segment.size \
                and not segment.live:
            self._corrupt(segment, offset, None)
            offset = segment.size
        return out, offset

    def _corrupt(self, segment: _Segment, start: int, end: Optional[int]) -> None:
        """Count a torn or corrupt line once, ever: mark it in the file (which we own) before counting."""
        if start in segment.bad:
            return
        segment.bad.add(start)
        if segment.adopted:  # only files we opened without O_APPEND, which no one else writes
            try:
                if end is None:  # a torn tail: cut it off
                    os.ftruncate(segment.fd, start)
                    segment.size = start
                else:  # overwrite in place with a marker line of the same length
                    os.pwrite(segment.fd, _COUNTED + b"-" * max(0, end - start - 1 - len(_COUNTED)) + b"\n", start)
            except OSError as exc:
                _logger.warning("otel-o2audit: cannot mark a corrupt line in %s: %s", segment.name, exc)
        COUNTERS.add("lost")
        _logger.error("otel-o2audit: 1 audit record LOST: a torn or corrupt line in spool file %s at byte %d "
                      "(a write cut by a crash); skipped", segment.name, start)

    def take(self, limit: int) -> Optional[Batch]:
        """The next records in spool order: adopted files first, then the live segment."""
        with self._lock:
            for segment in list(self._segments):
                if segment.read_pos >= segment.size:
                    continue
                records, end = self._read_lines(segment, segment.read_pos, limit)
                if end == segment.read_pos:
                    if not segment.live and segment.acked >= segment.size:
                        self._forget(segment)  # nothing but a torn tail was left
                    continue
                start, segment.read_pos = segment.read_pos, end
                return Batch(records, token=(segment, start, end), replay=segment.adopted)
            return None

    def settle(self, batch: Batch) -> None:
        """Acknowledge the batch on disk; delete a finished, no longer live segment."""
        segment, _start, end = batch.token
        with self._lock:
            if self._closed:
                return  # after close() the descriptor is gone: the next start replays the batch
            segment.acked = max(segment.acked, end)
            segment.count = max(0, segment.count - len(batch.records))
            if not segment.live and segment.acked >= segment.size:
                self._forget(segment)
                return
            try:
                self._write_ack(segment)
            except OSError as exc:  # duplicates after a restart, never a loss
                _logger.warning("otel-o2audit: cannot record spool progress for %s: %s", segment.name, exc)

    def _forget(self, segment: _Segment) -> None:
        self._remove(segment)
        with contextlib.suppress(ValueError):
            self._segments.remove(segment)

    def keep(self, batch: Batch) -> bool:
        """Rewind so the batch is taken again later; it stays on disk meanwhile."""
        segment, start, _end = batch.token
        with self._lock:
            segment.read_pos = min(segment.read_pos, start)
        return True

    def in_memory(self) -> int:
        """The spool holds records on disk, not in memory."""
        return 0

    def _sync(self) -> None:
        if self._dirty_since is not None and self._live is not None:
            os.fsync(self._live.fd)
            self._dirty_since = None

    def tick(self) -> None:
        """fsync on schedule and adopt the files of dead processes every few seconds."""
        with self._lock:
            if self._closed:
                return
            if self._dirty_since is not None and time.monotonic() - self._dirty_since >= self._fsync_interval:
                self._sync()
            if time.monotonic() - self._last_adopt >= _ADOPT_EVERY:
                self._adopt()

    def close(self) -> int:
        """fsync, release every segment (finished ones are deleted) and return the records left behind."""
        with self._lock:
            if self._closed:
                return 0
            self._closed = True
            self._sync()
            left = 0
            for segment in list(self._segments):
                if segment.acked >= segment.size:
                    self._remove(segment)
                else:
                    left += max(segment.count, 0)
                    os.close(segment.fd)  # releases the lock: the next start adopts it
            self._segments.clear()
            self._live = None
            return left

    def abandon(self) -> None:
        """In a forked child: close the inherited descriptors without touching the files (the parent's)."""
        for segment in self._segments:
            with contextlib.suppress(OSError):
                os.close(segment.fd)  # the parent's own descriptor keeps the lock
        self._segments = deque()
        self._live = None
        self._closed = True

    # ------------------------------------------------------------------ side folders
    def write_expired(self, records: Sequence[AuditRecord]) -> None:
        """Keep records too old for OpenObserve in ``expired/`` as plain JSON lines."""
        self._append_side("expired", records)

    def write_rejected(self, records: Sequence[AuditRecord]) -> None:
        """Keep a batch OpenObserve partly rejected in ``rejected/`` for inspection."""
        self._append_side("rejected", records)

    def _append_side(self, folder: str, records: Sequence[AuditRecord]) -> None:
        if not records:
            return
        name = f"{time.strftime('%Y%m%d')}-{socket.gethostname()}-{os.getpid()}.jsonl"
        path = os.path.join(self._dir, folder, name)
        data = b"".join(
            json.dumps(r, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8") + b"\n"
            for r in records
        )
        with self._lock:
            if self._total_bytes() + len(data) > self._max_bytes:
                _logger.error("otel-o2audit: %d records NOT kept in %s/: the spool is full "
                              "(O2_AUDIT_SPOOL_MAX_BYTES=%d); they are counted, not stored", len(records), folder,
                              self._max_bytes)
                return
            try:
                with open(path, "ab") as handle:
                    handle.write(data)
            except OSError as exc:
                _logger.error("otel-o2audit: cannot write %d records to %s: %s", len(records), path, exc)
                return
            self._side_bytes += len(data)
