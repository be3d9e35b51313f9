"""Configuration: the ``O2_AUDIT_*`` environment contract, parsed once into a frozen object.

Every variable has a keyword twin (the field name) for code users. Every problem found is reported at once,
in one :class:`ConfigError` whose message names each variable and what is wrong with its value; secrets are
never echoed.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import quote, unquote, urlsplit

from .redact import DEFAULT_SENSITIVE_NAMES, Redactor
from .routes import (
    DEFAULT_EXCLUDE_ROUTES,
    DEFAULT_INGESTION_ROUTES,
    RoutePattern,
    RouteTable,
    parse_patterns,
)

__all__ = ["ConfigError", "O2AuditConfig", "Secret"]

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NAME_RE = re.compile(r"[A-Za-z0-9_:.\-]+")


class ConfigError(ValueError):
    """Raised for an invalid configuration; the message names every offending variable."""


class Secret:
    """A string that never shows itself in ``repr``, ``str``, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret value; call only where it is put on the wire."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True)
class _Var:
    env: str
    field_name: str
    parse: Callable[[Any, str], Any]
    default: Any
    doc: str


def parse_bool(value: Any, env: str) -> bool:
    """Parse a boolean setting (``true/false/1/0/yes/no/on/off``, any case); ValueError names ``env``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{env}={value!r} is not a boolean (use true/false, 1/0, yes/no, on/off)")


def _as_positive_int(value: Any, env: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{env}={value!r} is not a whole number")
    try:
        number = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ValueError(f"{env}={value!r} is not a whole number") from None
    if number < 1:
        raise ValueError(f"{env}={value!r} must be at least 1")
    return number


def _as_positive_float(value: Any, env: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{env}={value!r} is not a number of seconds")
    try:
        number = float(str(value).strip()) if not isinstance(value, (int, float)) else float(value)
    except ValueError:
        raise ValueError(f"{env}={value!r} is not a number of seconds") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{env}={value!r} must be a positive number of seconds")
    return number


def _as_optional_str(value: Any, env: str) -> Optional[str]:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _as_secret(value: Any, env: str) -> Optional[Secret]:
    if value is None or isinstance(value, Secret):
        return value
    text = str(value)
    return Secret(text) if text else None


def _as_name(value: Any, env: str) -> str:
    text = str(value).strip()
    if not _NAME_RE.fullmatch(text):
        raise ValueError(f"{env}={value!r} must be a non-empty name of letters, digits, '_', '-', ':' or '.'")
    return text


def _as_list(value: Any) -> List[str]:
    if isinstance(value, str):
        return [part for part in (p.strip() for p in value.split(",")) if part]
    return [str(v).strip() for v in value if str(v).strip()]


def _as_routes(default: Sequence[str]) -> Callable[[Any, str], Tuple[RoutePattern, ...]]:
    def parse(value: Any, env: str) -> Tuple[RoutePattern, ...]:
        try:
            return parse_patterns(_as_list(value), default)
        except ValueError as exc:
            raise ValueError(f"{env}: invalid route pattern {exc}") from None

    return parse


def _as_names(value: Any, env: str) -> Tuple[str, ...]:
    return tuple(_as_list(value))


def _shown_url(text: str) -> str:
    # An endpoint may carry credentials or tokens: show it only when it plainly cannot.
    if "@" in text:
        return "<hidden: the value contains '@' and may hold credentials>"
    return repr(text.split("?", 1)[0].split("#", 1)[0])


def _as_endpoint(value: Any, env: str) -> Optional[str]:
    text = _as_optional_str(value, env)
    if text is None:
        return None
    shown = _shown_url(text)
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(f"{env}={shown}: a file endpoint is file:///absolute/path/audit.jsonl")
        if parts.path.endswith("/"):
            raise ValueError(f"{env}={shown}: a file endpoint must name a file, not a directory")
        return f"file://{unquote(parts.path)}"
    if scheme not in ("http", "https"):
        raise ValueError(f"{env}={shown}: unknown scheme; use http://, https:// or file://")
    if parts.username is not None or parts.password is not None:
        # Never echo the value: it holds credentials.
        raise ValueError(
            f"{env}: credentials must not be embedded in the URL; use O2_AUDIT_USER and O2_AUDIT_PASSWORD"
        )
    if not parts.hostname:
        raise ValueError(f"{env}={shown}: the URL has no host")
    try:
        parts.port  # noqa: B018 - urlsplit validates the port lazily
    except ValueError:
        raise ValueError(f"{env}={shown}: the port is not valid") from None
    if parts.query or parts.fragment:
        raise ValueError(f"{env}={shown}: the URL must not have a query or fragment")
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}"


_HEADER_RE = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def _as_nonnegative_float(value: Any, env: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{env}={value!r} is not a number of seconds")
    try:
        number = float(str(value).strip()) if not isinstance(value, (int, float)) else float(value)
    except ValueError:
        raise ValueError(f"{env}={value!r} is not a number of seconds") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{env}={value!r} must be zero or a positive number of seconds")
    return number


def _as_choice(*choices: str) -> Callable[[Any, str], Optional[str]]:
    def parse(value: Any, env: str) -> Optional[str]:
        text = _as_optional_str(value, env)
        if text is None:
            return None
        if text.lower() not in choices:
            raise ValueError(f"{env}={value!r} must be one of {', '.join(choices)}")
        return text.lower()

    return parse


def _as_readable_file(value: Any, env: str) -> Optional[str]:
    text = _as_optional_str(value, env)
    if text is None:
        return None
    if not os.path.isfile(text) or not os.access(text, os.R_OK):
        raise ValueError(f"{env}={text!r} is not a readable file")
    return text


def _as_directory(value: Any, env: str) -> Optional[str]:
    text = _as_optional_str(value, env)
    if text is None:
        return None
    if not os.path.isabs(text):
        raise ValueError(f"{env}={text!r} must be an absolute path")
    if os.path.exists(text) and not os.path.isdir(text):
        raise ValueError(f"{env}={text!r} exists and is not a directory")
    return text


def _as_networks(value: Any, env: str) -> Tuple[Network, ...]:
    networks = []
    for entry in _as_list(value):
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{env}: {entry!r} is not an IP address or CIDR range") from None
    return tuple(networks)


def _as_header_name(value: Any, env: str) -> Optional[str]:
    text = _as_optional_str(value, env)
    if text is None:
        return None
    if not _HEADER_RE.fullmatch(text):
        raise ValueError(f"{env}={value!r} is not a valid HTTP header name")
    return text.lower()


_VARS: Tuple[_Var, ...] = (
    _Var("O2_AUDIT_ENABLED", "enabled", parse_bool, False, "master switch for zero-code setup"),
    _Var("O2_AUDIT_ENDPOINT", "endpoint", _as_endpoint, None, "http(s)://host:port[/prefix] or file:///path"),
    _Var("O2_AUDIT_ORG", "org", _as_name, "_meta", "organization to write to"),
    _Var("O2_AUDIT_STREAM", "stream", _as_name, "audit", "stream to write to"),
    _Var("O2_AUDIT_USER", "user", _as_optional_str, None, "user email for Basic auth"),
    _Var("O2_AUDIT_PASSWORD", "password", _as_secret, None, "password or ingestion token"),
    _Var("O2_AUDIT_BATCH_SIZE", "batch_size", _as_positive_int, 500, "records per publish"),
    _Var("O2_AUDIT_PUBLISH_INTERVAL", "publish_interval", _as_positive_float, 600.0, "seconds"),
    _Var("O2_AUDIT_TIMEOUT", "timeout", _as_positive_float, 10.0, "seconds for one HTTP attempt"),
    _Var("O2_AUDIT_RETRY_MAX_ELAPSED", "retry_max_elapsed", _as_positive_float, 300.0, "retry window"),
    _Var("O2_AUDIT_RETRY_INITIAL_BACKOFF", "retry_initial_backoff", _as_positive_float, 1.0, "first backoff"),
    _Var("O2_AUDIT_SHUTDOWN_TIMEOUT", "shutdown_timeout", _as_positive_float, 10.0, "seconds to flush"),
    _Var("O2_AUDIT_MAX_QUEUE_SIZE", "max_queue_size", _as_positive_int, 10000, "records held in memory"),
    _Var(
        "O2_AUDIT_EXCLUDE_ROUTES",
        "exclude_routes",
        _as_routes(DEFAULT_EXCLUDE_ROUTES),
        ",".join(DEFAULT_EXCLUDE_ROUTES),
        "routes never audited",
    ),
    _Var(
        "O2_AUDIT_INGESTION_ROUTES",
        "ingestion_routes",
        _as_routes(DEFAULT_INGESTION_ROUTES),
        ",".join(DEFAULT_INGESTION_ROUTES),
        "routes that count as ingestion",
    ),
    _Var("O2_AUDIT_REDACT", "redact", _as_names, "", "extra sensitive names"),
    _Var("O2_AUDIT_REQUIRED", "required", parse_bool, False, "fail start-up on a configuration error"),
    # Delivery guarantees.
    _Var("O2_AUDIT_SPOOL_DIR", "spool_dir", _as_directory, None, "durable on-disk spool"),
    _Var("O2_AUDIT_SPOOL_MAX_BYTES", "spool_max_bytes", _as_positive_int, 1024**3, "spool disk budget"),
    _Var("O2_AUDIT_SPOOL_FSYNC_INTERVAL", "spool_fsync_interval", _as_nonnegative_float, 1.0, "fsync cadence"),
    _Var("O2_AUDIT_MAX_RECORD_AGE", "max_record_age", _as_positive_float, 5 * 3600.0, "ingestion window"),
    _Var("O2_AUDIT_OVERFLOW", "overflow", _as_choice("spool", "drop", "block"), None, "full-queue policy"),
    _Var("O2_AUDIT_BLOCK_TIMEOUT", "block_timeout", _as_nonnegative_float, 1.0, "overflow=block wait"),
    # Trustworthy records.
    _Var("O2_AUDIT_TRUSTED_PROXIES", "trusted_proxies", _as_networks, "", "proxies allowed to forward"),
    _Var("O2_AUDIT_USER_HEADER", "user_header", _as_header_name, None, "identity header of a trusted proxy"),
    _Var("O2_AUDIT_CAPTURE_BODY", "capture_body", parse_bool, False, "store redacted request bodies"),
    _Var("O2_AUDIT_MAX_BODY_BYTES", "max_body_bytes", _as_positive_int, 8192, "body bytes stored"),
    _Var("O2_AUDIT_CA_BUNDLE", "ca_bundle", _as_readable_file, None, "CA bundle for TLS verification"),
    _Var("O2_AUDIT_CLIENT_CERT", "client_cert", _as_readable_file, None, "client certificate (mTLS)"),
    _Var("O2_AUDIT_CLIENT_KEY", "client_key", _as_readable_file, None, "client private key (mTLS)"),
    _Var("O2_AUDIT_PASSWORD_FILE", "password_file", _as_readable_file, None, "file holding the password"),
    _Var("O2_AUDIT_HMAC_KEY", "hmac_key", _as_secret, None, "tamper-evidence key"),
    _Var("O2_AUDIT_HMAC_KEY_FILE", "hmac_key_file", _as_readable_file, None, "file holding the HMAC key"),
)

ENV_VARS: Dict[str, str] = {v.field_name: v.env for v in _VARS}


@dataclass(frozen=True)
class O2AuditConfig:
    """The validated configuration; build it with :meth:`from_env`."""

    enabled: bool = False
    endpoint: Optional[str] = None
    org: str = "_meta"
    stream: str = "audit"
    user: Optional[str] = None
    password: Optional[Secret] = field(default=None, repr=False)
    batch_size: int = 500
    publish_interval: float = 600.0
    timeout: float = 10.0
    retry_max_elapsed: float = 300.0
    retry_initial_backoff: float = 1.0
    shutdown_timeout: float = 10.0
    max_queue_size: int = 10000
    exclude_routes: Tuple[RoutePattern, ...] = field(default=(), repr=False)
    ingestion_routes: Tuple[RoutePattern, ...] = field(default=(), repr=False)
    redact: Tuple[str, ...] = ()
    required: bool = False
    spool_dir: Optional[str] = None
    spool_max_bytes: int = 1024**3
    spool_fsync_interval: float = 1.0
    max_record_age: float = 5 * 3600.0
    overflow: Optional[str] = None
    block_timeout: float = 1.0
    trusted_proxies: Tuple[Network, ...] = ()
    user_header: Optional[str] = None
    capture_body: bool = False
    max_body_bytes: int = 8192
    ca_bundle: Optional[str] = None
    client_cert: Optional[str] = None
    client_key: Optional[str] = None
    password_file: Optional[str] = None
    hmac_key: Optional[Secret] = field(default=None, repr=False)
    hmac_key_file: Optional[str] = None

    @property
    def overflow_policy(self) -> str:
        """``O2_AUDIT_OVERFLOW``, or its default: ``spool`` with a spool directory, else ``drop``."""
        return self.overflow or ("spool" if self.spool_dir else "drop")

    @classmethod
    def from_env(
        cls, environ: Optional[Mapping[str, str]] = None, *, require_endpoint: bool = True, **overrides: Any
    ) -> O2AuditConfig:
        """Read ``O2_AUDIT_*`` from ``environ`` (default ``os.environ``); keyword overrides win.

        Raises :class:`ConfigError` listing every invalid setting. ``require_endpoint=False`` accepts a
        configuration without an endpoint (used to read settings while auditing is off).
        """
        env = os.environ if environ is None else environ
        known = {v.field_name for v in _VARS}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown configuration keyword(s) {unknown}; known: {sorted(known)}")
        values: Dict[str, Any] = {}
        errors: List[str] = []
        for var in _VARS:
            if var.field_name in overrides and overrides[var.field_name] is not None:
                raw, name = overrides[var.field_name], f"{var.field_name} (keyword)"
                if var.field_name in ("password", "hmac_key"):
                    name = var.field_name
            elif var.env in env and env[var.env].strip() != "":
                raw, name = env[var.env], var.env
            else:
                raw, name = var.default, var.env
            try:
                values[var.field_name] = var.parse(raw, name)
            except ValueError as exc:
                errors.append(str(exc))
        errors.extend(_load_secret_files(values))
        errors.extend(_cross_check(values, require_endpoint))
        if errors:
            raise ConfigError("invalid otel-o2audit configuration:\n  - " + "\n  - ".join(errors))
        return cls(**values)

    # Derived views, cheap to build, used by the exporter and processor.
    def ingest_url(self) -> Optional[str]:
        """The ``_json`` ingestion URL, or ``None`` for a file endpoint."""
        if not self.endpoint or self.endpoint.startswith("file://"):
            return None
        return f"{self.endpoint}/api/{quote(self.org, safe='')}/{quote(self.stream, safe='')}/_json"

    def file_path(self) -> Optional[str]:
        """The JSON-lines file path for a ``file://`` endpoint, else ``None``."""
        if self.endpoint and self.endpoint.startswith("file://"):
            return self.endpoint[len("file://") :]
        return None

    def redactor(self) -> Redactor:
        """The redaction policy: the default sensitive names plus ``redact``."""
        return Redactor((*DEFAULT_SENSITIVE_NAMES, *self.redact))

    def skip_table(self) -> RouteTable:
        """Ingestion and excluded routes together: what is never audited."""
        return RouteTable((*self.ingestion_routes, *self.exclude_routes))

    def describe(self) -> Dict[str, Any]:
        """A log-safe summary (no secrets), for start-up messages and debugging."""
        out: Dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("password", "hmac_key"):
                value = "***" if value else None
            elif f.name == "trusted_proxies":
                value = [str(n) for n in value]
            elif f.name.endswith("_routes"):
                value = [p.text for p in value]
            out[f.name] = value
        return out


def _read_secret_file(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    # Secret mounts and `echo` leave a trailing newline that is not part of the secret.
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def _load_secret_files(values: Dict[str, Any]) -> List[str]:
    errors = []
    for file_key, secret_key, file_env, secret_env in (
        ("password_file", "password", "O2_AUDIT_PASSWORD_FILE", "O2_AUDIT_PASSWORD"),
        ("hmac_key_file", "hmac_key", "O2_AUDIT_HMAC_KEY_FILE", "O2_AUDIT_HMAC_KEY"),
    ):
        path = values.get(file_key)
        if path is None:
            continue
        if values.get(secret_key) is not None:
            errors.append(f"{file_env} and {secret_env} are both set: set only one")
            continue
        try:
            secret = _read_secret_file(path)
        except (OSError, UnicodeDecodeError) as exc:
            errors.append(f"{file_env}={path!r} cannot be read: {type(exc).__name__}")
            continue
        if not secret:
            errors.append(f"{file_env}={path!r} is empty")
            continue
        values[secret_key] = Secret(secret)
    key = values.get("hmac_key")
    if key is not None and len(key.reveal().encode("utf-8")) < 16:
        errors.append("O2_AUDIT_HMAC_KEY (or its file) must be at least 16 bytes long")
    if (values.get("client_cert") is None) != (values.get("client_key") is None) and values.get("client_key"):
        errors.append("O2_AUDIT_CLIENT_KEY is set without O2_AUDIT_CLIENT_CERT")
    return errors


def _cross_check(values: Mapping[str, Any], require_endpoint: bool) -> List[str]:
    # Runs even when some values failed to parse (those are missing from ``values``), so that one message
    # lists every problem.
    errors = []
    if "endpoint" not in values:
        endpoint = "invalid"
    elif values["endpoint"] is None:
        endpoint = None
    else:
        endpoint = values["endpoint"]
    if endpoint is None:
        if require_endpoint:
            errors.append(
                "O2_AUDIT_ENDPOINT is not set: give http(s)://host:port of OpenObserve "
                "or file:///path/to/audit.jsonl for a local file"
            )
    elif endpoint.startswith("http") and (values.get("user") is None or values.get("password") is None):
        missing = [n for n, k in (("O2_AUDIT_USER", "user"), ("O2_AUDIT_PASSWORD", "password"))
                   if k in values and not values[k]]
        if missing:
            errors.append(f"{' and '.join(missing)} must be set for an http(s) endpoint (Basic auth)")
    if values.get("overflow") == "spool" and not values.get("spool_dir"):
        errors.append("O2_AUDIT_OVERFLOW=spool needs O2_AUDIT_SPOOL_DIR")
    if "batch_size" in values and "max_queue_size" in values and values["batch_size"] > values["max_queue_size"]:
        errors.append(
            f"O2_AUDIT_BATCH_SIZE={values['batch_size']} exceeds "
            f"O2_AUDIT_MAX_QUEUE_SIZE={values['max_queue_size']}: a batch could never fill"
        )
    return errors
