"""Tamper evidence: a keyed hash chain over audit records, after CloudTrail's digest chain.

Every record a process publishes is *sealed* by one :class:`Chain`: it gets the chain's id, the next sequence
number, the previous record's MAC and an HMAC-SHA256 over its canonical form (which includes that previous
MAC). Each publish interval, even when idle, and at graceful shutdown the processor adds a *checkpoint*: a
sealed record of its own (``record_type: "checkpoint"``) that takes a sequence number too, so deleting records,
checkpoints or whole intervals always leaves a gap that ``o2audit verify`` (``verify.py``) finds.

Fields added by :meth:`Chain.seal` (all keys canonical, no nulls, so OpenObserve stores them unchanged):

=====================  =========================================================================================
``record_type``        ``"request"`` unless the record already has one; ``"checkpoint"`` for checkpoints
``chain_id``           32 hex digits, random per process (a forked child starts its own chain)
``chain_seq``          1, 2, 3, ... in sealing order, checkpoints included
``chain_prev``         ``chain_mac`` of the record with ``chain_seq - 1``; ``""`` for seq 1
``chain_fields``       comma-separated sorted names of the fields the MAC covers: every key of the sealed record
                       except ``chain_mac`` (itself included). Columns a server adds later are not covered
``chain_mac``          64 hex digits: HMAC-SHA256(key, ``"o2audit-chain-v1\\n"`` + canonical form)
=====================  =========================================================================================

Checkpoints also carry ``chain_last_seq`` (seq of the last request record sealed before it, 0 for none),
``checkpoint_prev_seq`` (seq of the previous checkpoint, 0 for none), ``checkpoint_closing`` (bool: the
chain ends here), ``checkpoint_dropped`` (records this chain's process declared dropped before sealing, since
the chain began), ``checkpoint_lost`` (when non-empty: sealed records declared lost in delivery, as
``<chain_id>:<first>-<last>:<count>`` entries joined by ``;``, cumulative) and, when configured,
``checkpoint_interval_s`` (the publish interval). They carry the audit-record core keys with empty values
(``""``; ``http_response_code`` 0; ``event_id`` ``chk-<chain_id>-<seq>``) so dashboards keep working; filter
them out with ``record_type = 'checkpoint'``.

Canonical form (what the MAC covers; it survives OpenObserve's storage round trip): the covered fields in
sorted order as a JSON object without spaces, values encoded as: strings as JSON strings (ASCII escapes);
bools as ``true``/``false``; ints and floats as one decimal text (``2`` and ``2.0`` are both ``2``; floats are
rounded half-even to 6 decimal places, trailing zeros dropped: ``12.3460001`` is ``12.346``); a field that is
missing or ``null`` when verifying counts as ``""`` (a server may drop empty values). ``seal`` first puts the
record in the form OpenObserve stores: keys lower-cased with characters outside ``[a-z0-9_]`` replaced by
``_``; ``None`` and non-finite floats removed; lists and dicts turned into compact JSON text; other objects
into ``str()``; ``_timestamp`` made integer microseconds (unit detected by magnitude like the server;
missing, zero or non-numeric becomes the chain's clock).
"""

from __future__ import annotations

import hmac
import json
import math
import os
import re
import threading
import time
import uuid
import weakref
from decimal import ROUND_HALF_EVEN, Context, Decimal
from hashlib import sha256
from typing import Any, Callable, Dict, Iterable, List, Mapping, MutableMapping, Optional, Tuple

__all__ = [
    "CHECKPOINT",
    "MAC_PREFIX",
    "REQUEST",
    "CanonicalError",
    "Chain",
    "LostEntry",
    "canonical_bytes",
    "canonical_value",
    "compute_mac",
    "covered_fields",
    "format_lost",
    "parse_lost",
    "verify_mac",
]

REQUEST = "request"
CHECKPOINT = "checkpoint"
#: Domain separation and format version of the MAC input.
MAC_PREFIX = b"o2audit-chain-v1\n"
#: Fields every sealed record's ``chain_fields`` must list (the verifier rejects a list without them).
REQUIRED_FIELDS = frozenset({"_timestamp", "record_type", "chain_id", "chain_seq", "chain_prev", "chain_fields"})
MIN_KEY_BYTES = 16

#: One loss declaration: (chain_id, first seq, last seq, at most this many of them lost).
LostEntry = Tuple[str, int, int, int]

_MAX_LOST_ENTRIES = 64
_KEY_RE = re.compile(r"[^a-z0-9_]")
_MAC_RE = re.compile(r"[0-9a-f]{64}")
_LOST_RE = re.compile(r"^([A-Za-z0-9_.\-]+):([0-9]+)-([0-9]+):([0-9]+)$")
_DECIMALS = Decimal("0.000001")
_DECIMAL_CONTEXT = Context(prec=60, rounding=ROUND_HALF_EVEN)
# OpenObserve's timestamp unit detection (BASE_TIME = 1971-01-01 in ns, us, ms).
_BASE_S = 31_536_000
_BASE_NS = _BASE_S * 1_000_000_000
_BASE_US = _BASE_S * 1_000_000
_BASE_MS = _BASE_S * 1_000
# Checkpoints carry the core keys with neutral values so dashboards over the stream keep working.
_CHECKPOINT_CORE: Dict[str, Any] = {
    "user_email": "",
    "org_id": "",
    "protocol": "",
    "http_method": "",
    "http_path": "",
    "http_query_params": "",
    "http_body": "",
    "http_response_code": 0,
    "trace_id": "",
}


class CanonicalError(ValueError):
    """A value has no canonical form (only possible for records not produced by :meth:`Chain.seal`)."""


def _now_us() -> int:
    return time.time_ns() // 1000


def _number_text(value: float) -> str:
    if not math.isfinite(value):
        raise CanonicalError(f"non-finite number {value!r}")
    if value.is_integer():
        return str(int(value))
    rounded = Decimal(repr(value)).quantize(_DECIMALS, context=_DECIMAL_CONTEXT)
    text = format(rounded.normalize(_DECIMAL_CONTEXT), "f")
    return "0" if text in ("-0", "0") else text


def canonical_value(value: Any) -> str:
    """The canonical text of one field value (see the module docstring)."""
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _number_text(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=True)
    raise CanonicalError(f"a {type(value).__name__} value has no canonical form")


def canonical_bytes(record: Mapping[str, Any], fields: Iterable[str]) -> bytes:
    """The canonical serialization of ``record``'s ``fields`` (sorted; missing fields count as ``""``)."""
    parts = [f"{json.dumps(name, ensure_ascii=True)}:{canonical_value(record.get(name))}" for name in sorted(fields)]
    return ("{" + ",".join(parts) + "}").encode("ascii")


def compute_mac(key: bytes, record: Mapping[str, Any], fields: Iterable[str]) -> str:
    """HMAC-SHA256 (hex) of ``MAC_PREFIX`` + the canonical form of ``fields``."""
    return hmac.new(key, MAC_PREFIX + canonical_bytes(record, fields), sha256).hexdigest()


def covered_fields(record: Mapping[str, Any]) -> Optional[List[str]]:
    """The field names ``chain_fields`` lists, or None when it is absent, malformed or lacks a required field."""
    text = record.get("chain_fields")
    if not isinstance(text, str) or not text:
        return None
    names = text.split(",")
    if any(not n or _KEY_RE.search(n) for n in names) or "chain_mac" in names or len(set(names)) != len(names):
        return None
    if not REQUIRED_FIELDS.issubset(names):
        return None
    return names


def verify_mac(key: bytes, record: Mapping[str, Any]) -> bool:
    """True when ``record``'s ``chain_mac`` is the MAC of the fields its ``chain_fields`` lists."""
    mac = record.get("chain_mac")
    fields = covered_fields(record)
    if not isinstance(mac, str) or not _MAC_RE.fullmatch(mac) or fields is None:
        return False
    try:
        expected = compute_mac(key, record, fields)
    except CanonicalError:
        return False
    return hmac.compare_digest(expected, mac)


def format_lost(entries: Iterable[LostEntry]) -> str:
    """``checkpoint_lost`` text for ``entries``."""
    return ";".join(f"{c}:{a}-{b}:{k}" for c, a, b, k in sorted(entries))


def parse_lost(text: Any) -> List[LostEntry]:
    """The entries of a ``checkpoint_lost`` value; malformed entries are ignored."""
    if not isinstance(text, str) or not text:
        return []
    out: List[LostEntry] = []
    for part in text.split(";"):
        match = _LOST_RE.match(part.strip())
        if match:
            first, last, count = int(match[2]), int(match[3]), int(match[4])
            if 1 <= first <= last and count >= 0:
                out.append((match[1], first, last, count))
    return out


def _timestamp_us(raw: Any, clock: Callable[[], int]) -> int:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        return clock()
    if isinstance(raw, float) and not math.isfinite(raw):
        return clock()
    value = int(raw)
    if value == 0:
        return clock()
    if value > _BASE_NS:
        return value // 1000
    if value > _BASE_US:
        return value
    if value > _BASE_MS:
        return value * 1000
    return value * 1_000_000


def _stored_value(value: Any) -> Any:
    """``value`` as OpenObserve will store it (None: the key is dropped)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (dict, list, tuple)):
        try:
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True, default=str)
        except (TypeError, ValueError):  # keys of mixed types, a cycle: fall back to the text form
            return str(value)
    return str(value)


def _normalize(record: MutableMapping[str, Any], clock: Callable[[], int]) -> None:
    """Put ``record`` in the form OpenObserve stores, in place (key order kept where possible)."""
    items = list(record.items())
    record.clear()
    for raw_key, raw_value in items:
        key = _KEY_RE.sub("_", str(raw_key).lower())
        value = _stored_value(raw_value)
        if value is None:
            continue
        record[key] = value  # keys colliding after formatting overwrite each other, as on the server
    record["_timestamp"] = _timestamp_us(record.get("_timestamp"), clock)


class Chain:
    """One process's chain of sealed records. Thread-safe; a forked child continues with a fresh chain.

    ``key``: the HMAC key (at least 16 bytes). ``chain_id``: the first chain's id (default: random
    ``uuid4().hex``; a forked child and a chain continued after its closing checkpoint get random ids).
    ``clock``: microseconds since the epoch for checkpoints and records without ``_timestamp``.
    ``checkpoint_interval``: the publish interval in seconds, stated in checkpoints so the verifier knows
    how often to expect them.
    """

    def __init__(
        self,
        key: bytes,
        *,
        chain_id: Optional[str] = None,
        clock: Optional[Callable[[], int]] = None,
        checkpoint_interval: Optional[float] = None,
    ) -> None:
        if not isinstance(key, (bytes, bytearray)) or len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the chain key must be at least {MIN_KEY_BYTES} bytes")
        if chain_id is not None and not re.fullmatch(r"[A-Za-z0-9_.\-]{1,128}", chain_id):
            raise ValueError("chain_id must be 1-128 characters of letters, digits, '_', '-' or '.'")
        if checkpoint_interval is not None and not (math.isfinite(checkpoint_interval) and checkpoint_interval > 0):
            raise ValueError("checkpoint_interval must be a positive number of seconds")
        self._key = bytes(key)
        self._clock: Callable[[], int] = clock or _now_us
        self._interval = checkpoint_interval
        self._lock = threading.Lock()
        self._lost: Dict[str, List[Tuple[int, int, int]]] = {}
        self._start(chain_id)
        if hasattr(os, "register_at_fork"):
            ref = weakref.ref(self)

            def after_fork() -> None:
                chain = ref()
                if chain is not None:
                    chain._after_fork()

            os.register_at_fork(after_in_child=after_fork)

    def __repr__(self) -> str:
        return f"Chain(chain_id={self._chain_id!r}, last_seq={self._seq})"

    def _start(self, chain_id: Optional[str] = None) -> None:
        self._chain_id = chain_id or uuid.uuid4().hex
        self._pid = os.getpid()
        self._seq = 0
        self._prev = ""
        self._last_request_seq = 0
        self._last_checkpoint_seq = 0
        self._dropped = 0
        self._closed = False

    def _after_fork(self) -> None:
        # The parent's lock may have been held by another thread at fork time; the parent's chain and
        # its loss declarations stay the parent's.
        self._lock = threading.Lock()
        self._lost = {}
        self._start()

    def _ready(self, *, reopen: bool = True) -> None:
        if self._pid != os.getpid():  # a fork the at-fork hook did not see
            self._lost = {}
            self._start()
        elif reopen and self._closed:
            self._start()

    @property
    def chain_id(self) -> str:
        """The current chain's id."""
        with self._lock:
            return self._chain_id

    @property
    def last_seq(self) -> int:
        """The sequence number of the last record sealed into the current chain (0: none yet)."""
        with self._lock:
            return self._seq

    def seal(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """Seal ``record`` in place and return it (see the module docstring).

        A record that already carries ``chain_id`` and ``chain_mac`` is returned unchanged: it was sealed
        before (a checkpoint passing through a sealing store, or a record of an earlier process replayed
        from the spool), and re-sealing would break that record's own chain.
        """
        if "chain_mac" in record and "chain_id" in record:
            return record
        with self._lock:
            self._ready()
            return self._seal_locked(record)

    def _seal_locked(self, record: Dict[str, Any]) -> Dict[str, Any]:
        _normalize(record, self._clock)
        if not isinstance(record.get("record_type"), str) or not record["record_type"]:
            record["record_type"] = REQUEST
        seq = self._seq + 1
        record["chain_id"] = self._chain_id
        record["chain_seq"] = seq
        record["chain_prev"] = self._prev
        record.pop("chain_mac", None)
        fields = sorted({*record, "chain_fields"})
        record["chain_fields"] = ",".join(fields)
        mac = compute_mac(self._key, record, fields)
        record["chain_mac"] = mac
        self._seq = seq
        self._prev = mac
        if record["record_type"] != CHECKPOINT:
            self._last_request_seq = seq
        return record

    def checkpoint(self, *, closing: bool = False, fields: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """A new sealed checkpoint record stating the chain's state; ``closing=True`` ends the chain.

        ``fields`` adds extra keys (e.g. ``service_name``); they cannot override chain or checkpoint keys.
        After a closing checkpoint the next record sealed starts a new chain.
        """
        with self._lock:
            self._ready()
            seq = self._seq + 1
            record: Dict[str, Any] = {"_timestamp": self._clock(), **_CHECKPOINT_CORE}
            for name, value in (fields or {}).items():
                if not str(name).startswith(("chain_", "checkpoint_")) and name not in ("record_type", "event_id"):
                    record[name] = value
            record.update(
                {
                    "event_id": f"chk-{self._chain_id}-{seq}",
                    "record_type": CHECKPOINT,
                    "chain_last_seq": self._last_request_seq,
                    "checkpoint_prev_seq": self._last_checkpoint_seq,
                    "checkpoint_closing": bool(closing),
                    "checkpoint_dropped": self._dropped,
                }
            )
            if self._interval is not None:
                record["checkpoint_interval_s"] = float(self._interval)
            lost = [(c, a, b, k) for c, entries in self._lost.items() for a, b, k in entries]
            if lost:
                record["checkpoint_lost"] = format_lost(lost)
            sealed = self._seal_locked(record)
            self._last_checkpoint_seq = seq
            if closing:
                self._closed = True
            return sealed

    def note_lost(self, records: Iterable[Mapping[str, Any]], count: Optional[int] = None) -> None:
        """Declare that sealed ``records`` (or at most ``count`` of them) will never be delivered.

        The next checkpoints state it (``checkpoint_lost``), so ``o2audit verify`` reports those gaps as
        declared losses, not tampering. Records of other chains (spool replays of an earlier process) are
        declared too; records without a chain are ignored. Call it only for a final outcome.
        """
        groups: Dict[str, List[int]] = {}
        for record in records:
            chain_id, seq = record.get("chain_id"), record.get("chain_seq")
            if isinstance(chain_id, str) and isinstance(seq, int) and not isinstance(seq, bool) and seq >= 1:
                groups.setdefault(chain_id, []).append(seq)
        with self._lock:
            for chain_id, seqs in groups.items():
                lost = len(seqs) if count is None else max(0, min(count, len(seqs)))
                if lost:
                    self._add_lost(chain_id, min(seqs), max(seqs), lost)

    def _add_lost(self, chain_id: str, first: int, last: int, count: int) -> None:
        entries = self._lost.setdefault(chain_id, [])
        entries.append((first, last, count))
        entries.sort()
        while sum(len(e) for e in self._lost.values()) > _MAX_LOST_ENTRIES:
            # Merge the two closest entries of one chain: a wider range with the summed count stays sound.
            best: Optional[Tuple[int, str, int]] = None
            for cid, items in self._lost.items():
                for i in range(len(items) - 1):
                    distance = items[i + 1][0] - items[i][1]
                    if best is None or distance < best[0]:
                        best = (distance, cid, i)
            if best is None:  # one entry per chain: forget the oldest chain's declaration
                del self._lost[next(iter(self._lost))]
                continue
            _, cid, i = best
            items = self._lost[cid]
            a, b, k = items[i]
            _, d, m = items[i + 1]
            items[i : i + 2] = [(a, max(b, d), k + m)]

    def note_dropped(self, count: int = 1) -> None:
        """Declare records dropped before they were sealed (e.g. a full queue); checkpoints state the total."""
        if count > 0:
            with self._lock:
                self._ready(reopen=False)
                self._dropped += count
