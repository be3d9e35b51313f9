"""Completeness under sampling: a request's SERVER span is always recorded, whatever the sampler says.

A sampler that drops a server span (a ratio sampler, ``always_off``, or a caller's ``traceparent`` with the
sampled flag off under the default parent-based sampler) would remove the request from a span-based audit
trail. :class:`AuditSampler` wraps the user's sampler and turns a DROP of a SERVER span into RECORD_ONLY:
the span is recorded and reaches the audit processor, but it is not sampled, so exporters fed by the SDK's
BatchSpanProcessor still see exactly the spans the user's sampler chose, the sampled flag propagated
downstream is unchanged, and child spans under a parent-based sampler stay unrecorded. Only SERVER spans
are upgraded; the cost is recording one span per request that would otherwise not be recorded.
"""

from __future__ import annotations

from typing import Optional, Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

__all__ = ["AuditSampler", "ensure_audit_sampler"]


class AuditSampler(Sampler):
    """Delegates to ``inner`` but never lets it DROP a SERVER span (RECORD_ONLY instead)."""

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner

    def should_sample(
        self,
        parent_context: Optional[Context],
        trace_id: int,
        name: str,
        kind: Optional[SpanKind] = None,
        attributes: Attributes = None,
        links: Optional[Sequence[Link]] = None,
        trace_state: Optional[TraceState] = None,
    ) -> SamplingResult:
        """The inner sampler's decision, with DROP of a SERVER span raised to RECORD_ONLY."""
        result = self.inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)
        if kind is SpanKind.SERVER and result.decision is Decision.DROP:
            # The SDK starts a span with the sampler's attributes, and a DROP carries none: keep the
            # attributes the instrumentation passed (WSGI puts method and path only there).
            merged = {**(attributes or {}), **(result.attributes or {})}
            return SamplingResult(Decision.RECORD_ONLY, merged, result.trace_state)
        return result

    def get_description(self) -> str:
        """``AuditSampler{<inner description>}``."""
        return f"AuditSampler{{{self.inner.get_description()}}}"


def ensure_audit_sampler(provider: TracerProvider) -> None:
    """Wrap ``provider``'s sampler once. Tracers obtained before this call keep the sampler they had."""
    sampler = provider.sampler
    if not isinstance(sampler, AuditSampler):
        provider.sampler = AuditSampler(sampler)
