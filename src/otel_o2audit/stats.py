"""Process-wide counters of what happened to every audited request: nothing is lost without a count."""

from __future__ import annotations

import os
import threading
from typing import Dict, Tuple

__all__ = ["COUNTER_KEYS", "stats"]

#: Every counter ``stats()`` reports. ``captured`` counts records accepted into the pipeline; each of them
#: ends as ``published``, ``rejected`` (the server refused it inside an HTTP 200 or with 413), or ``lost``
#: (given up on, with a logged reason). ``dropped`` counts requests refused at the door because the queue
#: was full. ``retried`` counts re-sent batches' records. ``spooled``, ``replayed`` and ``expired`` belong to
#: the disk spool and stay 0 without one. ``skipped`` counts server spans not audited (ingestion, excluded).
COUNTER_KEYS: Tuple[str, ...] = (
    "captured",
    "published",
    "retried",
    "spooled",
    "replayed",
    "dropped",
    "expired",
    "rejected",
    "lost",
    "skipped",
)


class _Counters:
    __slots__ = ("_lock", "_values")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: Dict[str, int] = dict.fromkeys(COUNTER_KEYS, 0)

    def add(self, key: str, amount: int = 1) -> None:
        if amount:
            with self._lock:
                self._values[key] += amount

    def snapshot(self) -> Dict[str, int]:
        with self._lock:
            return dict(self._values)

    def reset(self) -> None:
        with self._lock:
            self._values = dict.fromkeys(COUNTER_KEYS, 0)

    def after_fork(self) -> None:
        # A child's counters describe the child's own records only.
        self._lock = threading.Lock()
        self._values = dict.fromkeys(COUNTER_KEYS, 0)


COUNTERS = _Counters()
_fork_hook: list[bool] = []


def ensure_fork_hook() -> None:
    """Reset the counters in forked children (registered once, on first use, not at import)."""
    if not _fork_hook and hasattr(os, "register_at_fork"):
        _fork_hook.append(True)
        os.register_at_fork(after_in_child=COUNTERS.after_fork)


def stats() -> Dict[str, int]:
    """A snapshot of this process's audit counters (see ``COUNTER_KEYS`` for their meaning)."""
    return COUNTERS.snapshot()


_metrics_registered: list[bool] = []


def register_metrics() -> None:
    """Export the counters as the OTel counter ``o2audit.records`` (meter ``otel_o2audit``), once.

    Each counter key is an ``outcome`` attribute value. Registered against the global MeterProvider: with
    the API's default provider nothing is exported; a provider set later picks the instrument up.
    """
    if _metrics_registered:
        return
    _metrics_registered.append(True)
    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions, Observation

    def observe(options: CallbackOptions) -> list[Observation]:
        return [Observation(value, {"outcome": key}) for key, value in COUNTERS.snapshot().items()]

    meter = metrics.get_meter("otel_o2audit")
    meter.create_observable_counter(
        "o2audit.records", callbacks=[observe], unit="{record}",
        description="Audit records by outcome: captured, published, retried, spooled, replayed, dropped, "
                    "expired, rejected, lost, skipped",
    )
