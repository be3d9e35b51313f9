"""Zero-code setup: the ``opentelemetry_post_instrument`` entry point run by ``opentelemetry-instrument``.

It must never raise (a raising hook aborts the instrumentation of the whole application), except when the
user asked for a hard stop with ``O2_AUDIT_REQUIRED=true``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from .config import ConfigError, O2AuditConfig, parse_bool

__all__ = ["EXIT_CONFIG_ERROR", "handle_config_error", "post_instrument"]

_logger = logging.getLogger("otel_o2audit")

#: Exit status when ``O2_AUDIT_REQUIRED=true`` and the configuration is invalid (sysexits' EX_CONFIG).
EXIT_CONFIG_ERROR = 78


def _required() -> bool:
    return os.environ.get("O2_AUDIT_REQUIRED", "").strip().lower() in ("true", "1", "yes", "on")


def handle_config_error(error: ConfigError) -> None:
    """Zero-code rule for a bad configuration: log at ERROR and run un-audited, or exit if required."""
    if _required():
        sys.stderr.write(f"otel-o2audit: {error}\notel-o2audit: O2_AUDIT_REQUIRED=true, refusing to start "
                         "un-audited\n")
        sys.stderr.flush()
        os._exit(EXIT_CONFIG_ERROR)
    _logger.error("otel-o2audit: %s\nthe application runs WITHOUT an audit trail "
                  "(set O2_AUDIT_REQUIRED=true to refuse to start instead)", error)


def pre_instrument(*args: Any, **kwargs: Any) -> None:
    """Install before the instrumentors run, so that their tracers already use the audit sampler."""
    post_instrument()


def post_instrument(*args: Any, **kwargs: Any) -> None:
    """Install the audit processor when ``O2_AUDIT_ENABLED`` is true; otherwise do nothing at all.

    Registered as both ``opentelemetry_pre_instrument`` and ``opentelemetry_post_instrument`` hooks; the
    second call finds the processor installed and does nothing.
    """
    try:
        _setup()
    except Exception:
        _logger.exception("otel-o2audit: zero-code setup failed; the application runs WITHOUT an audit trail")


_attempted: list[bool] = []


def _setup() -> None:
    if _attempted:  # the pre- and post-instrument hooks both call us: act (and report errors) once
        return
    _attempted.append(True)
    raw = os.environ.get("O2_AUDIT_ENABLED", "").strip()
    if not raw:
        return
    # The switch alone first: auditing that is off must not complain about the settings it does not use.
    try:
        enabled = parse_bool(raw, "O2_AUDIT_ENABLED")
    except ValueError as exc:
        handle_config_error(ConfigError(f"invalid otel-o2audit configuration:\n  - {exc}"))
        return
    if not enabled:
        return
    try:
        config = O2AuditConfig.from_env()
    except ConfigError as exc:
        handle_config_error(exc)
        return
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        _logger.info("otel-o2audit: OTEL_SDK_DISABLED=true; auditing is off")
        return
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        _logger.warning("otel-o2audit: O2_AUDIT_ENABLED=true but the global TracerProvider is %s, not the "
                        "SDK's (is opentelemetry-distro or another configurator installed?); not auditing",
                        type(provider).__name__)
        return
    from .middleware import patch_frameworks
    from .setup import install

    install(provider, config=config)
    # Request facts spans do not carry (peer, forwarded addresses, Basic-auth user, bodies) come from our
    # middleware, which zero-code users cannot add themselves.
    patch_frameworks(config)
