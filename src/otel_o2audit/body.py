"""Request bodies: a bounded copy on the request path, rendered and redacted on the worker thread.

Capture (:class:`BodyCapture`, fed by the library's ASGI/WSGI middleware) copies at most
``O2_AUDIT_MAX_BODY_BYTES`` of what the application reads and counts the rest; the application receives
every chunk unchanged. Rendering (:func:`render_body`) runs when the record is built, off the request path:

* ``application/json`` and ``*+json`` (also JSON lines): stored as sent (formatting and repeated names
  kept), except that every value of a sensitive name, at any depth, becomes ``"[REDACTED]"`` (an object or
  array under a sensitive name goes whole). Names are compared after JSON unescaping (``"pass\\u0077ord"``
  is ``password``). A body cut at the cap, or not valid JSON, is read by a tolerant tokenizer: values of
  sensitive names are masked up to the cut, a partial name at the cut is dropped, and at the first syntax
  error (unquoted names, single quotes, a form labelled JSON) the rest is dropped and replaced by
  ``[invalid JSON: rest dropped]``. No value of a sensitive name can survive a cut;
* ``application/x-www-form-urlencoded``: field by field, with the same rules as query strings;
* ``multipart/form-data``: rendered as a JSON object of its fields; text fields are redacted by name, file
  parts (a filename, or a non-text content type) are never stored:
  ``"[file: report.pdf, application/pdf, 5321 bytes]"``;
* other text (``text/*``, XML, YAML, GraphQL, ...): stored as text, with best-effort masking of the values
  that follow sensitive names in ``name=value``, ``name: value``, quoted and ``<name>value</name>`` forms;
* anything else is binary and never stored: ``"[binary body: image/png, 48213 bytes]"``;
* ``Content-Encoding: gzip``/``x-gzip``/``deflate`` bodies are inflated with a hard output bound (the cap
  plus one byte), so a decompression bomb allocates no more than the cap; other encodings (``br``,
  ``zstd``, several layered encodings) are not decoded: ``"[br-encoded body: application/json, 912 bytes]"``.

Text is decoded as UTF-8 (or a declared UTF-16/Latin-1 charset) with replacement characters for invalid
bytes; a multi-byte character cut by the cap is dropped. The stored text never exceeds the cap (in UTF-8
bytes); when anything is missing, the record says ``http_body_truncated: true``. A body the application
never read is not captured (its size is still recorded when declared).
"""

from __future__ import annotations

import codecs
import json
import re
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from .redact import REDACTED, Redactor
from .scope import one_line

__all__ = ["BodyCapture", "RenderedBody", "parse_content_length", "redact_json_text", "redact_text",
           "render_body"]

_MAX_HEADER_CHARS = 256
_MAX_FILENAME_CHARS = 128
_REDACTED_JSON = json.dumps(REDACTED)


class BodyCapture:
    """The first ``limit`` bytes of a request body as the application reads it, and its total size."""

    __slots__ = ("complete", "content_encoding", "content_type", "data", "declared_length", "limit", "size")

    def __init__(self, limit: int, content_type: Optional[str] = None, content_encoding: Optional[str] = None,
                 declared_length: Optional[int] = None) -> None:
        self.limit = max(0, int(limit))
        self.content_type = content_type[:_MAX_HEADER_CHARS] if content_type else None
        self.content_encoding = content_encoding[:_MAX_HEADER_CHARS] if content_encoding else None
        self.declared_length = declared_length
        self.data = bytearray()
        #: Bytes the application has read so far (kept or not).
        self.size = 0
        #: True once the end of the body was seen.
        self.complete = False

    def feed(self, chunk: Union[bytes, bytearray, memoryview]) -> None:
        """Account for ``chunk`` (already passed on to the application); keep it while under the limit."""
        length = len(chunk)
        if not length:
            return
        room = self.limit - len(self.data)
        if room > 0:
            self.data += chunk if length <= room else chunk[:room]
        self.size += length
        if self.declared_length is not None and self.size >= self.declared_length:
            self.complete = True

    def __repr__(self) -> str:
        return f"BodyCapture(kept={len(self.data)}, size={self.size}, complete={self.complete})"


def parse_content_length(value: Optional[str]) -> Optional[int]:
    """``Content-Length`` as a non-negative int, or None when absent or malformed."""
    if value is None:
        return None
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        return None
    return int(text)


@dataclass(frozen=True)
class RenderedBody:
    """What the record stores about a body: the redacted text and its metadata."""

    text: str
    truncated: bool
    size: int
    content_type: Optional[str]


def _parse_content_type(value: Optional[str]) -> Tuple[str, Dict[str, str]]:
    if not value:
        return "", {}
    media, _, rest = value.partition(";")
    params: Dict[str, str] = {}
    for match in re.finditer(r'([A-Za-z0-9_*.\-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)', rest):
        raw = match.group(2).strip()
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[match.group(1).lower()] = raw
    return media.strip().lower(), params


_TEXT_TYPES = frozenset({
    "application/xml", "application/javascript", "application/ecmascript", "application/graphql",
    "application/yaml", "application/x-yaml", "application/toml", "application/csv", "application/sql",
})
_JSON_TYPES = frozenset({"application/x-ndjson", "application/jsonl", "application/json-seq", "application/x-json"})


def _kind(media: str) -> Optional[str]:
    if not media:
        return None
    if media == "application/json" or media.endswith("+json") or media in _JSON_TYPES or media == "text/json":
        return "json"
    if media == "application/x-www-form-urlencoded":
        return "form"
    if media.startswith("multipart/"):
        return "multipart"
    if media.startswith("text/") or media in _TEXT_TYPES or media.endswith(("+xml", "+yaml")):
        return "text"
    return "binary"


_CHARSETS = {"utf-8": "utf-8", "utf8": "utf-8", "us-ascii": "utf-8", "ascii": "utf-8",
             "iso-8859-1": "latin-1", "latin-1": "latin-1", "latin1": "latin-1", "windows-1252": "cp1252",
             "cp1252": "cp1252", "utf-16": "utf-16", "utf-16le": "utf-16-le", "utf-16be": "utf-16-be"}


def _decode(data: bytes, charset: Optional[str], truncated: bool) -> str:
    codec = _CHARSETS.get((charset or "utf-8").strip().lower(), "utf-8")
    decoder = codecs.getincrementaldecoder(codec)(errors="replace")
    # A character cut by the cap stays in the decoder (final=False) instead of becoming U+FFFD.
    return str(decoder.decode(data, final=not truncated))


def _looks_binary(data: bytes) -> bool:
    sample = data[:1024]
    if b"\x00" in sample:
        return True
    text = sample.decode("utf-8", "replace")
    bad = sum(1 for c in text if c == "\ufffd" or (ord(c) < 32 and c not in "\t\r\n\f"))
    return bad * 10 > max(1, len(text))


def _inflate(data: bytes, encoding: str, limit: int) -> Optional[Tuple[bytes, bool]]:
    """Inflate at most ``limit`` bytes; (output, incomplete) or None when the data is not decodable.

    Every ``decompress`` call gets ``max_length`` (never 0, which would mean "unbounded"), so a
    decompression bomb never expands past ``limit + 1`` bytes of output.
    """
    gzip = encoding in ("gzip", "x-gzip")
    for wbits in ([16 + zlib.MAX_WBITS] if gzip else [zlib.MAX_WBITS, -zlib.MAX_WBITS]):
        inflater = zlib.decompressobj(wbits)
        try:
            out = bytearray(inflater.decompress(data, limit + 1))
        except zlib.error:
            continue
        incomplete = not inflater.eof
        # gzip allows several members one after the other.
        pending = inflater.unused_data if gzip and inflater.eof else b""
        while pending and len(out) <= limit:
            inflater = zlib.decompressobj(wbits)
            try:
                out += inflater.decompress(pending, limit + 1 - len(out))
            except zlib.error:
                break
            if not inflater.eof:
                incomplete = True
                break
            pending = inflater.unused_data
        return bytes(out[:limit]), incomplete or len(out) > limit
    return None


def truncate_utf8(text: str, limit: int) -> Tuple[str, bool]:
    """``text`` cut to at most ``limit`` UTF-8 bytes without splitting a character, and whether it was cut."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text, False
    return data[:limit].decode("utf-8", "ignore"), True


def _cap_utf8(text: str, limit: int) -> Tuple[str, bool]:
    text, cut = truncate_utf8(text, limit)
    if not cut:
        return text, False
    for length in range(len(REDACTED) - 1, 0, -1):
        if text.endswith(REDACTED[:length]):
            return text[:-length], True  # no half marker at the end
    return text, True


# ---------------------------------------------------------------------------------------------- JSON
_WS = re.compile(r"[ \t\r\n]+")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_SCALAR = re.compile(r'[^\s{}\[\]:,"]+')
_SKIP_STOPS = re.compile(r'["{}\[\]]')
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_PARTIAL_NUMBER = re.compile(r"-?[0-9]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]*)?")
_LITERALS = ("true", "false", "null", "NaN", "Infinity", "-Infinity")


def _is_scalar(token: str, at_end: bool) -> bool:
    """A JSON number or literal; at the end of a cut text, also the beginning of one."""
    if token in _LITERALS or _NUMBER.fullmatch(token):
        return True
    if at_end:
        return any(literal.startswith(token) for literal in _LITERALS) or bool(_PARTIAL_NUMBER.fullmatch(token))
    return False


def _needs_redaction(text: str, redactor: Redactor) -> bool:
    """Parse ``text`` as JSON (ValueError/RecursionError if it is not) and tell whether any name, at any
    depth, is sensitive. Every key is seen, repeated ones included (``object_pairs_hook``)."""
    found: List[bool] = []

    def check(pairs: List[Tuple[str, Any]]) -> None:
        if not found and any(redactor.is_sensitive(key) for key, _ in pairs):
            found.append(True)

    json.loads(text, object_pairs_hook=check)
    return bool(found)


def _skip_value(text: str, pos: int) -> int:
    """End of the JSON value starting at ``pos`` (lenient), or ``len(text)`` if it runs past the end."""
    end = len(text)
    char = text[pos]
    if char == '"':
        match = _STRING.match(text, pos)
        return match.end() if match else end
    if char not in "{[":
        match = _SCALAR.match(text, pos)
        return match.end() if match else pos
    depth = 0
    while pos < end:
        found = _SKIP_STOPS.search(text, pos)
        if found is None:
            return end
        pos = found.start()
        char = text[pos]
        if char == '"':
            match = _STRING.match(text, pos)
            if match is None:
                return end
            pos = match.end()
            continue
        depth += 1 if char in "{[" else -1
        pos += 1
        if depth <= 0:
            return pos
    return end


class _Frame:
    __slots__ = ("expect", "kind", "sensitive")

    def __init__(self, kind: str, expect: str) -> None:
        self.kind = kind  # "object", "array" or "top" (a sequence of top-level values, as in JSON lines)
        self.expect = expect  # "key", "colon", "value" or "comma"
        self.sensitive = False


def _key_is_sensitive(raw: str, redactor: Redactor) -> bool:
    if "\\" not in raw:
        return redactor.is_sensitive(raw[1:-1])
    try:
        key = json.loads(raw)
    except ValueError:
        return True  # an undecodable name might be anything: treat its value as sensitive
    return not isinstance(key, str) or redactor.is_sensitive(key)


def _tokenize_redact(text: str, redactor: Redactor) -> Tuple[str, bool]:
    """Redact possibly cut or invalid JSON; (text, syntax_error). Iterative: any depth, any length."""
    out: List[str] = []
    stack = [_Frame("top", "value")]
    pos, end = 0, len(text)
    while pos < end:
        char = text[pos]
        if char in " \t\r\n":
            space = _WS.match(text, pos)
            assert space is not None
            out.append(space.group())
            pos = space.end()
            if pos >= end:
                break
            char = text[pos]
        frame = stack[-1]
        if frame.expect == "key":
            if char == '"':
                match = _STRING.match(text, pos)
                if match is None:
                    return "".join(out), False  # a name cut at the end: dropped
                frame.sensitive = _key_is_sensitive(match.group(), redactor)
                out.append(match.group())
                frame.expect = "colon"
                pos = match.end()
                continue
            if char == "}":
                stack.pop()
                out.append(char)
                pos += 1
                continue
            return "".join(out), True
        if frame.expect == "colon":
            if char != ":":
                return "".join(out), True
            out.append(char)
            frame.expect = "value"
            pos += 1
            continue
        if frame.expect == "comma":
            if char == "," and frame.kind != "top":
                out.append(char)
                frame.expect = "key" if frame.kind == "object" else "value"
                pos += 1
                continue
            if (char == "}" and frame.kind == "object") or (char == "]" and frame.kind == "array"):
                stack.pop()
                out.append(char)
                pos += 1
                continue
            if frame.kind != "top":
                return "".join(out), True
            frame.expect = "value"  # another top-level value (JSON lines)
        # expect == "value"
        if frame.kind == "object" and frame.sensitive:
            skipped = _skip_value(text, pos)
            if skipped == pos:
                return "".join(out), True
            out.append(_REDACTED_JSON)
            frame.expect = "comma"
            pos = skipped
            continue
        if char in "{[":
            frame.expect = "comma"
            stack.append(_Frame("object", "key") if char == "{" else _Frame("array", "value"))
            out.append(char)
            pos += 1
            continue
        if char == "]" and frame.kind == "array":
            stack.pop()
            out.append(char)
            pos += 1
            continue
        if char == '"':
            match = _STRING.match(text, pos)
            if match is None:
                out.append(text[pos:])  # a value of a non-sensitive name, cut at the end
                return "".join(out), False
            out.append(match.group())
            frame.expect = "comma"
            pos = match.end()
            continue
        match = _SCALAR.match(text, pos)
        if match is None or not _is_scalar(match.group(), at_end=match.end() == end):
            return "".join(out), True  # not JSON (a form or a word labelled JSON): the rest is dropped
        out.append(match.group())
        frame.expect = "comma"
        pos = match.end()
    return "".join(out), False


def redact_json_text(text: str, redactor: Redactor, truncated: bool = False) -> Tuple[str, bool]:
    """Redact a JSON document (or JSON lines); returns (text, invalid). ``truncated``: it may be cut."""
    if not truncated:
        try:
            if not _needs_redaction(text, redactor):
                return text, False  # valid JSON without a sensitive name: exactly as sent
        except (ValueError, RecursionError):
            pass
    redacted, invalid = _tokenize_redact(text, redactor)
    if invalid:
        redacted = (redacted.rstrip() + " " if redacted.strip() else "") + "[invalid JSON: rest dropped]"
    return redacted, invalid


# ---------------------------------------------------------------------------------------------- text
_XML_OPEN = re.compile(r"<(?P<tag>[A-Za-z_][\w.\-:]*)(?:\s[^<>]*)?>")
_XML_VALUE = re.compile(r"(?:<!\[CDATA\[.*?(?:\]\]>|\Z)|[^<])*", re.DOTALL)
# A name (not preceded by another name character, optionally quoted) and its separator. Only the name and
# the separator are matched: the value of a name that is not sensitive is scanned like any other text.
_NAME_SEP = re.compile(r"(?<![\w.\-])(?P<quote>[\"']?)(?P<name>[\w.\-]+)(?P=quote)[ \t]*[:=][ \t]*")
_TEXT_VALUE = re.compile(r"\"(?:[^\"\\]|\\.)*(?:\"|\Z)|'(?:[^'\\]|\\.)*(?:'|\Z)|[^\r\n&]*", re.DOTALL)


def _mask_after(text: str, opener: re.Pattern[str], value: re.Pattern[str],
                sensitive: Callable[[re.Match[str]], bool]) -> str:
    out: List[str] = []
    last = 0
    for match in opener.finditer(text):
        if match.start() < last or not sensitive(match):
            continue
        found = value.match(text, match.end())
        if found is None or found.end() == match.end():
            continue
        quote = found.group()[0] if found.group()[0] in "\"'" else ""
        out.append(text[last : match.end()])
        out.append(f"{quote}{REDACTED}{quote}")
        last = found.end()
    if not out:
        return text
    out.append(text[last:])
    return "".join(out)


def redact_text(text: str, redactor: Redactor) -> str:
    """Best-effort masking of values after sensitive names in free text: ``name=value`` and ``name: value``
    (the value runs to the end of the line, or to ``&``), quoted names and values, XML elements and
    attributes. Values of other names are scanned too, so a sensitive pair inside them is still found."""
    text = _mask_after(text, _XML_OPEN, _XML_VALUE,
                       lambda m: redactor.is_sensitive(m.group("tag").rpartition(":")[2]))
    return _mask_after(text, _NAME_SEP, _TEXT_VALUE, lambda m: redactor.is_sensitive(m.group("name")))


# ---------------------------------------------------------------------------------------------- multipart
_DISPOSITION_PARAM = re.compile(r';\s*([A-Za-z0-9_*\-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def _part_headers(raw: bytes) -> Dict[str, str]:
    headers: Dict[str, str] = {}
    for line in raw.decode("utf-8", "replace").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


def _disposition(value: str) -> Dict[str, str]:
    params: Dict[str, str] = {}
    for match in _DISPOSITION_PARAM.finditer(value):
        raw = match.group(2).strip()
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            raw = raw[1:-1]
        params[match.group(1).lower()] = raw
    return params


def _render_multipart(data: bytes, boundary: str, redactor: Redactor, truncated: bool) -> Tuple[str, bool]:
    delimiter = b"--" + boundary.encode("latin-1", "replace")
    chunks = data.split(delimiter)
    fields: Dict[str, Any] = {}
    cut = False
    for index, chunk in enumerate(chunks[1:], start=1):
        last = index == len(chunks) - 1
        if chunk.startswith(b"--"):
            break  # the closing delimiter
        head, sep, content = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            cut = cut or last
            break  # headers cut at the cap: the part is dropped
        partial = last and truncated
        if not partial:
            content = content.removesuffix(b"\r\n")
        else:
            # The cut may fall inside the next delimiter: that is not content.
            tail = b"\r\n" + delimiter
            for length in range(min(len(tail), len(content)), 0, -1):
                if content.endswith(tail[:length]):
                    content = content[:-length]
                    break
        headers = _part_headers(head)
        params = _disposition(headers.get("content-disposition", ""))
        name = params.get("name", "")
        is_file = "filename" in params or "filename*" in params
        filename = params.get("filename") or params.get("filename*") or ""
        part_media, part_params = _parse_content_type(headers.get("content-type"))
        kind = _kind(part_media) if part_media else "text"
        if is_file or kind in ("binary", "multipart"):
            described = ", ".join(p for p in (one_line(filename, _MAX_FILENAME_CHARS), one_line(part_media, 128)) if p)
            size = f"{'>=' if partial else ''}{len(content)} bytes"
            value: str = f"[file: {described}, {size}]" if described else f"[file: {size}]"
        elif redactor.is_sensitive(name):
            value = REDACTED
        else:
            value = _redact_decoded(_decode(content, part_params.get("charset"), partial), kind, redactor, partial)
        previous = fields.get(name)
        if previous is None:
            fields[name] = value
        elif isinstance(previous, list):
            previous.append(value)
        else:
            fields[name] = [previous, value]
    return json.dumps(fields, ensure_ascii=False), cut


def _redact_decoded(text: str, kind: Optional[str], redactor: Redactor, partial: bool) -> str:
    """Redact decoded body text by its kind: JSON field by field, forms like a query, anything else as text."""
    if kind == "json":
        return redact_json_text(text, redactor, partial)[0]
    if kind == "form":
        return redactor.redact_query(text)
    return redact_text(text, redactor)


# ---------------------------------------------------------------------------------------------- render
def _marker(kind: str, media: str, size: int, note: str = "") -> str:
    parts = [p for p in (one_line(media, 128), f"{size} bytes", note) if p]
    return f"[{kind}: {', '.join(parts)}]"


def render_body(capture: BodyCapture, redactor: Redactor, limit: Optional[int] = None) -> Optional[RenderedBody]:
    """The stored form of a captured body; None when the request had no body."""
    limit = capture.limit if limit is None else limit
    declared = capture.declared_length
    size = max(capture.size, declared or 0)
    media, params = _parse_content_type(capture.content_type)
    content_type = one_line(media, 128) or None
    if size == 0:
        return None
    data = bytes(capture.data)
    truncated = capture.size > len(data) or capture.size < size or (not capture.complete and declared is None)
    if not data:
        return RenderedBody("", truncated, size, content_type)
    encoding = (capture.content_encoding or "").strip().lower()
    if encoding and encoding != "identity":
        if encoding not in ("gzip", "x-gzip", "deflate"):
            return RenderedBody(_marker(f"{one_line(encoding, 32)}-encoded body", media, size), truncated, size,
                                content_type)
        inflated = _inflate(data, encoding, limit)
        if inflated is None:
            return RenderedBody(_marker(f"{encoding}-encoded body", media, size, "not decodable"), truncated,
                                size, content_type)
        data, incomplete = inflated
        truncated = truncated or incomplete
    kind = _kind(media)
    if kind is None:
        kind = _sniff(data)
    text: str
    if kind == "binary":
        return RenderedBody(_marker("binary body", media, size), False, size, content_type)
    if kind == "multipart":
        boundary = params.get("boundary")
        if not boundary:
            return RenderedBody(_marker("multipart body", media, size, "no boundary"), False, size, content_type)
        text, cut = _render_multipart(data, boundary, redactor, truncated)
        truncated = truncated or cut
    else:
        text = _redact_decoded(_decode(data, params.get("charset"), truncated), kind, redactor, truncated)
    text, cut = _cap_utf8(text, limit)
    return RenderedBody(text, truncated or cut, size, content_type)


def _sniff(data: bytes) -> str:
    if _looks_binary(data):
        return "binary"
    head = data.lstrip()[:1]
    if head in (b"{", b"["):
        return "json"
    sample = data[:256]
    if b"=" in sample and not re.search(rb"\s", data):
        return "form"
    return "text"
