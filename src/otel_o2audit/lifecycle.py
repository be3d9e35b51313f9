"""Publishing what is pending when the process ends, including the exits that bypass ``atexit``.

Three hooks, all installed by :func:`otel_o2audit.install` and idempotent:

* ``atexit``: a normal interpreter exit shuts every live processor down (also when the TracerProvider was
  built with ``shutdown_on_exit=False``).
* SIGTERM/SIGINT handlers that flush, then chain to whatever handler was there before. uvicorn restores
  the handlers it found and re-raises the signal after its graceful shutdown; with the default action that
  kills the process without ``atexit``, so when the previous handler is the default our handler shuts the
  processors down first, then re-raises with the default action (the exit status stays "killed by signal").
* uvicorn's ``Server.shutdown``: gunicorn's ``UvicornWorker`` resets signal handlers after the fork, and an
  application that calls ``install()`` at import time runs inside uvicorn's signal capture; in both cases
  our handler never runs. Wrapping ``Server.shutdown`` (when uvicorn is installed) flushes after uvicorn has
  drained its connections and before it re-raises the signal.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import importlib.util
import logging
import signal
import threading
import time
from types import FrameType
from typing import Any, Callable, Dict, Optional, Union

from .processor import live_processors

__all__ = ["flush_all", "install_hooks", "shutdown_all"]

_logger = logging.getLogger("otel_o2audit")
_lock = threading.Lock()
_state: Dict[str, bool] = {}
_previous: Dict[int, Any] = {}
_Handler = Union[Callable[[int, Optional[FrameType]], Any], int, None]


# One shutdown budget per exit: the hooks of one exit (uvicorn's shutdown, then the re-raised signal) share
# O2_AUDIT_SHUTDOWN_TIMEOUT instead of each waiting for all of it.
_exit_started: Dict[str, float] = {}


def _remaining(timeout: float) -> float:
    now = time.monotonic()
    started = _exit_started.get("at")
    if started is None or now - started > timeout + 1.0:
        started = _exit_started["at"] = now  # a new exit sequence
    return max(0.0, started + timeout - now)


def flush_all(reason: str) -> None:
    """Publish everything pending in every live processor, within this exit's shutdown budget."""
    for processor in live_processors():
        try:
            timeout = _remaining(processor.exporter.config.shutdown_timeout)
            if not processor.force_flush(int(timeout * 1000)):
                _logger.warning("otel-o2audit: flush on %s did not complete within %.1fs", reason, timeout)
        except Exception:  # a shutdown hook must not raise
            _logger.exception("otel-o2audit: flush on %s failed", reason)


# Set when the SDK built an active ``o2audit`` exporter (OTEL_TRACES_EXPORTER=o2audit): its records wait
# in the SDK's BatchSpanProcessor, so an exit that skips atexit must flush the provider too.
_flush_provider: Dict[str, bool] = {}


def flush_provider_on_exit() -> None:
    """Ask the exit hooks to flush the global SDK TracerProvider (used by the exporter path)."""
    _flush_provider["yes"] = True


def _flush_global_provider(reason: str) -> None:
    if not _flush_provider:
        return
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        return
    timeout = _remaining(10.0)
    # The SDK's force_flush may ignore its timeout: run it on a helper thread and wait at most the budget.
    worker = threading.Thread(target=provider.force_flush, args=(int(timeout * 1000),),
                              name="otel-o2audit-exit-flush", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        _logger.warning("otel-o2audit: flushing the TracerProvider on %s did not finish within %.1fs", reason,
                        timeout)


def shutdown_all(reason: str) -> None:
    """Publish what is pending and stop every live processor, within this exit's shutdown budget."""
    for processor in live_processors():
        try:
            processor.shutdown(_remaining(processor.exporter.config.shutdown_timeout) * 1000)
        except Exception:  # a shutdown hook must not raise
            _logger.exception("otel-o2audit: shutdown on %s failed", reason)


def _on_signal(signum: int, frame: Optional[FrameType]) -> None:
    previous = _previous.get(signum, signal.SIG_DFL)
    name = signal.Signals(signum).name
    if previous is signal.SIG_IGN:
        return
    if previous is signal.SIG_DFL:
        # The default action ends the process without atexit: publish everything now.
        shutdown_all(name)
        _flush_global_provider(name)
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
        return
    flush_all(name)
    if callable(previous):
        previous(signum, frame)


def _install_signal_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        _logger.debug("otel-o2audit: not on the main thread; signal handlers not installed")
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        current = signal.getsignal(signum)
        if current is _on_signal or current is None:
            continue  # ours already, or a handler installed from C that we could not chain to
        _previous[signum] = current
        signal.signal(signum, _on_signal)


def _wrap_uvicorn_shutdown() -> None:
    if importlib.util.find_spec("uvicorn") is None:
        return
    try:
        from uvicorn.server import Server
    except Exception:
        _logger.debug("otel-o2audit: uvicorn not importable; no server shutdown hook", exc_info=True)
        return
    original = getattr(Server, "shutdown", None)
    if original is None or getattr(original, "_otel_o2audit", False):
        return

    @functools.wraps(original)
    async def shutdown(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await original(self, *args, **kwargs)
        finally:
            # Off the event loop: the flush may wait for the sink.
            if getattr(self, "_captured_signals", None):
                # uvicorn re-raises the signal next; under gunicorn's UvicornWorker its action is the
                # default one, which ends the process without atexit: stop the processors now.
                await asyncio.to_thread(shutdown_all, "uvicorn shutdown")
            else:
                await asyncio.to_thread(flush_all, "uvicorn shutdown")
            await asyncio.to_thread(_flush_global_provider, "uvicorn shutdown")

    shutdown._otel_o2audit = True  # type: ignore[attr-defined]
    Server.shutdown = shutdown  # type: ignore[method-assign]


def install_hooks() -> None:
    """Install the exit hooks once per process (signal handlers only from the main thread)."""
    with _lock:
        if not _state.get("atexit"):
            atexit.register(shutdown_all, "interpreter exit")
            _state["atexit"] = True
        if not _state.get("uvicorn"):
            _wrap_uvicorn_shutdown()
            _state["uvicorn"] = True
        _install_signal_handlers()
