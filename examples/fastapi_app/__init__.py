"""Example FastAPI service audited by otel-o2audit (see README.md in this directory)."""
