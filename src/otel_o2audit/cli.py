"""The ``o2audit`` command line."""

from __future__ import annotations

import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``o2audit`` console script."""
    from .verify import main as verify_main

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write("usage: o2audit verify [options] [FILE]\n")
        return 0 if args else 2
    if args[0] == "verify":
        return verify_main(args[1:])
    sys.stderr.write(f"o2audit: unknown command {args[0]!r}; try: o2audit verify --help\n")
    return 2
