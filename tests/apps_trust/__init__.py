"""Applications and helpers for the trust tests (identity, client address, bodies, redaction, zero-code)."""
