"""``python -m tests.apps_trust.serve_patched APP [uvicorn options]``: uvicorn's own CLI, after the framework hook.

Run under ``opentelemetry-instrument`` with ``O2_AUDIT_ENABLED=true``, this is exactly what zero-code setup
does once ``otel_o2audit.autoinstrument`` calls :func:`otel_o2audit.middleware.patch_frameworks` after
installing the processor: the hook is applied from the environment's settings, then the unmodified
application is served by uvicorn with its real defaults (``--proxy-headers`` for 127.0.0.1 included).
"""

from __future__ import annotations

import uvicorn

from otel_o2audit.config import O2AuditConfig
from otel_o2audit.middleware import patch_frameworks

if __name__ == "__main__":
    patch_frameworks(O2AuditConfig.from_env(require_endpoint=False))
    uvicorn.main(prog_name="uvicorn")
