"""One table before it becomes text, and the cell wording every report shares.

:class:`Table` holds a title, headers, cells (already formatted strings) and which columns are numeric;
:meth:`Table.text` renders it with tabulate (``table``: "simple", ``markdown``: GitHub pipes) and
:meth:`Table.html` as an HTML ``<table>``. :func:`module_label`, :func:`pct` and :func:`heading` word a
module name, a share and a section title the same way in every report.

Limits: cells are text when they get here (numbers are formatted by the caller; tabulate is told not to
parse them back); the html form escapes every cell and indents tree rows by depth, nothing more.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

__all__ = ["Table", "heading", "module_label", "pct"]

_TABLEFMT = {"table": "simple", "markdown": "github"}


def module_label(name: str) -> str:
    """A module's name in a table: the root (``""``) is ``(root)``."""
    return name if name else "(root)"


def pct(part: int, whole: int) -> str:
    """``part`` as a percentage of ``whole`` with one decimal, ``-`` when ``whole`` is zero."""
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def heading(title: str, fmt: str) -> str:
    """A section title: ``## title`` in markdown, else the title underlined with ``=``."""
    return f"## {title}" if fmt == "markdown" else f"{title}\n{'=' * len(title)}"


class Table:
    """Headers, cells and which columns are numeric: one table before it becomes text."""

    def __init__(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]],
                 numeric: Sequence[bool], pairs: bool = False, indent: Sequence[int] | None = None) -> None:
        self.title, self.headers, self.rows, self.numeric = title, list(headers), [list(r) for r in rows], numeric
        self.pairs = pairs  # key/value rows: no header, keys bold in markdown
        self.indent = indent  # per row: tree depth of the first cell (html only; text keeps full names)

    def text(self, fmt: str) -> str:
        from tabulate import tabulate

        if not self.rows:
            return "(none)"
        if self.pairs and fmt == "markdown":
            return "\n".join(f"- **{k}:** {v}" for k, v in self.rows)
        if self.pairs:
            return tabulate(self.rows, tablefmt="plain", disable_numparse=True)
        align = ["right" if n else "left" for n in self.numeric]
        return tabulate(self.rows, self.headers, tablefmt=_TABLEFMT[fmt], colalign=align, disable_numparse=True)

    def html(self) -> str:
        def cell(tag, value, numeric):
            cls = ' class="num"' if numeric else ""
            return f"<{tag}{cls}>{html.escape(str(value))}</{tag}>"

        if self.pairs:
            rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                           for k, v in self.rows)
            return f'<table class="pairs"><tbody>{rows}</tbody></table>'

        def row(i, r):
            cells = [cell("td", v, n) for v, n in zip(r, self.numeric)]
            if self.indent is not None and self.indent[i]:
                cells[0] = cells[0].replace("<td>", f'<td style="padding-left:{10 + 16 * self.indent[i]}px">', 1)
            return "<tr>" + "".join(cells) + "</tr>"

        head = "".join(cell("th", h, n) for h, n in zip(self.headers, self.numeric))
        body = "".join(row(i, r) for i, r in enumerate(self.rows))
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
