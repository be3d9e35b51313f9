"""Where captured records wait for their publish: in memory, or in the durable spool (``spool.py``).

Both stores hand out batches in capture order and are told what became of each batch: ``settle`` (the
outcome is final: delivered, rejected or accounted as lost) or ``keep`` (not delivered yet, try later).
Only the spool can keep a batch; the memory store answers False and the caller counts the records lost.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, List, Optional, Protocol, Sequence

from .record import AuditRecord

__all__ = ["Batch", "MemoryStore", "Store"]

#: Called on each record, in order, as it enters a store (the tamper-evidence chain seals it there).
Sealer = Callable[[AuditRecord], AuditRecord]


@dataclass
class Batch:
    """Records taken from a store for one publish; ``token`` lets the store settle or keep them."""

    records: List[AuditRecord]
    token: Any = None
    replay: bool = False  # records of an earlier process or run, read back from the spool


class Store(Protocol):
    """The interface the processor's threads use; implementations are thread-safe."""

    durable: bool

    def add(self, records: Sequence[AuditRecord]) -> int:
        """Append records (sealing them first); return how many were accepted (the rest are accounted)."""

    def pending(self) -> int:
        """Records waiting to be taken."""

    def oldest(self) -> Optional[int]:
        """``_timestamp`` (µs) of the oldest waiting record; 0 for a replay backlog (send it at once)."""

    def take(self, limit: int) -> Optional[Batch]:
        """The next batch of at most ``limit`` records in order, or None."""

    def settle(self, batch: Batch) -> None:
        """The batch's outcome is final: forget it (the spool acknowledges it on disk)."""

    def keep(self, batch: Batch) -> bool:
        """The batch was not delivered; True when the store keeps it to be taken again later."""

    def in_memory(self) -> int:
        """Records this store holds in memory (for the queue bound)."""

    def tick(self) -> None:
        """Periodic housekeeping from the collector thread (fsync, adopting orphaned spool files)."""

    def close(self) -> int:
        """Release resources; return how many records stay behind undelivered (on disk, for a later run)."""


class MemoryStore:
    """A FIFO of records in memory; what it cannot deliver is lost (and counted by the caller)."""

    durable = False

    def __init__(self, sealer: Optional[Sealer] = None) -> None:
        self._records: Deque[AuditRecord] = deque()
        self._lock = threading.Lock()
        self._sealer = sealer

    def add(self, records: Sequence[AuditRecord]) -> int:
        """Append ``records`` in order."""
        with self._lock:
            for record in records:
                self._records.append(self._sealer(record) if self._sealer else record)
        return len(records)

    def pending(self) -> int:
        """Records waiting."""
        return len(self._records)

    def oldest(self) -> Optional[int]:
        """The oldest waiting record's ``_timestamp``."""
        try:
            return int(self._records[0]["_timestamp"])
        except IndexError:
            return None

    def take(self, limit: int) -> Optional[Batch]:
        """Pop up to ``limit`` records."""
        with self._lock:
            if not self._records:
                return None
            count = min(limit, len(self._records))
            return Batch([self._records.popleft() for _ in range(count)])

    def settle(self, batch: Batch) -> None:
        """Nothing to do: taken records are already gone from memory."""

    def keep(self, batch: Batch) -> bool:
        """Memory keeps nothing back: the caller accounts the batch as lost."""
        return False

    def in_memory(self) -> int:
        """Same as :meth:`pending`."""
        return len(self._records)

    def tick(self) -> None:
        """Nothing periodic to do."""

    def close(self) -> int:
        """Nothing stays behind: what was not taken is the caller's to count."""
        return 0
