"""Tables the README carries but the code owns: replace one in place, or tell that it is stale."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path


def replace_table(readme: str, table: str) -> str:
    """`readme` with the table that starts with `table`'s header line replaced by `table` (which ends with a
    newline); the old table ends at the first blank line."""
    start = readme.index(table.splitlines()[0] + "\n")
    end = readme.find("\n\n", start)
    return readme[:start] + table + readme[end + 1 if end != -1 else len(readme):]


def rewrite_main(table: Callable[[], str]) -> None:
    """`python -m <module> [README.md]`: regenerate the module's table in place."""
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    path.write_text(replace_table(path.read_text(), table()))
