"""Tables rendered twice: aligned plain text for the terminal, GitHub markdown for ``results.md``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

__all__ = ["Report", "Section", "blocks", "fmt_ratio", "keep_blocks", "put_block", "verdict", "write_block"]


def fmt_ratio(value: float) -> str:
    """``1.23x``."""
    return f"{value:.2f}x"


def verdict(passed: bool) -> str:
    """PASS or MISS."""
    return "PASS" if passed else "MISS"


@dataclass
class Section:
    """A titled table with notes under it (notes are plain sentences; ``code`` blocks are preformatted)."""

    title: str
    headers: Sequence[str] = ()
    rows: List[Sequence[str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    code: List[str] = field(default_factory=list)

    def text(self) -> str:
        """Aligned plain text."""
        out = [self.title, "=" * len(self.title)]
        if self.headers:
            widths = [max(len(str(row[i])) for row in [self.headers, *self.rows]) for i in range(len(self.headers))]
            numeric = [all(_numeric(str(row[i])) for row in self.rows) for i in range(len(self.headers))]

            def line(row: Sequence[str]) -> str:
                cells = [
                    str(cell).rjust(width) if is_number else str(cell).ljust(width)
                    for cell, width, is_number in zip(row, widths, numeric)
                ]
                return "  ".join(cells).rstrip()

            out.append(line(self.headers))
            out.append("  ".join("-" * w for w in widths))
            out.extend(line(row) for row in self.rows)
        for note in self.notes:
            out.append(f"  * {note}")
        for block in self.code:
            out.append("")
            out.extend(f"    {text}" for text in block.splitlines())
        return "\n".join(out)

    def markdown(self) -> str:
        """GitHub-flavoured markdown."""
        out = [f"### {self.title}", ""]
        if self.headers:
            numeric = [all(_numeric(str(row[i])) for row in self.rows) for i in range(len(self.headers))]
            out.append("| " + " | ".join(self.headers) + " |")
            out.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
            out.extend("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in self.rows)
            out.append("")
        for note in self.notes:
            out.append(f"- {note}")
        if self.notes:
            out.append("")
        for block in self.code:
            out.extend(["```text", block, "```", ""])
        return "\n".join(out).rstrip() + "\n"


def _numeric(text: str) -> bool:
    stripped = text.replace(",", "").replace("x", "").replace("%", "").replace("-", "").replace(".", "").strip()
    return stripped.isdigit() if stripped else text in ("-", "")


@dataclass
class Report:
    """The whole result: a title, a lead paragraph and sections."""

    title: str
    lead: List[str]
    sections: List[Section]

    def text(self) -> str:
        """For the terminal."""
        head = [self.title, "#" * len(self.title), *self.lead]
        return "\n\n".join(["\n".join(head), *(s.text() for s in self.sections)]) + "\n"

    def markdown(self) -> str:
        """For ``results.md`` / the README."""
        head = [f"## {self.title}", "", *(f"{line}  " for line in self.lead)]
        return "\n".join(head).rstrip() + "\n\n" + "\n".join(s.markdown() for s in self.sections)


# Sections written by other run.py modes (``--outage``, ``--spool-path``) live in results.md between markers,
# so that each mode replaces only its own part of the file and keeps the others.
_BEGIN = "<!-- bench:{key}:begin -->"
_END = "<!-- bench:{key}:end -->"


def blocks(text: str) -> List[Tuple[str, str]]:
    """The marked blocks of ``text``, in order: (key, the block including its markers)."""
    out: List[Tuple[str, str]] = []
    position = 0
    while True:
        start = text.find("<!-- bench:", position)
        if start < 0:
            return out
        head_end = text.find(":begin -->", start)
        if head_end < 0:
            return out
        key = text[start + len("<!-- bench:") : head_end]
        end_marker = _END.format(key=key)
        end = text.find(end_marker, head_end)
        if end < 0:
            return out
        end += len(end_marker)
        out.append((key, text[start:end]))
        position = end


def put_block(text: str, key: str, markdown: str) -> str:
    """``text`` with the block ``key`` set to ``markdown`` (replaced in place, or appended at the end)."""
    block = f"{_BEGIN.format(key=key)}\n{markdown.rstrip()}\n{_END.format(key=key)}"
    for existing_key, existing in blocks(text):
        if existing_key == key:
            return text.replace(existing, block, 1)
    return (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"


def write_block(path: str, key: str, markdown: str) -> None:
    """Set the block ``key`` of the markdown file at ``path``, keeping everything else in it."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        text = ""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(put_block(text, key, markdown))


def keep_blocks(path: str, markdown: str) -> str:
    """``markdown`` (a whole new file) followed by the marked blocks the file at ``path`` holds now."""
    try:
        with open(path, encoding="utf-8") as handle:
            old = handle.read()
    except FileNotFoundError:
        return markdown
    for _key, block in blocks(old):
        markdown = markdown.rstrip() + "\n\n" + block + "\n"
    return markdown
