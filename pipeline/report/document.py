"""The report's document model: headings, paragraphs, bullets, tables and figures, rendered to
Markdown and to one self-contained HTML file (inline CSS, figures as data: URIs, no link out).

    doc = Doc(); doc.h(1, "title"); doc.table(["a"], [[1]]); doc.markdown(); doc.html("title")
"""
from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Doc:
    """Blocks rendered to both Markdown and HTML. Text may hold `code` spans; nothing else is
    interpreted, so run tags and error messages print as written."""

    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def bullets(self, items: Sequence[str]) -> None:
        self.blocks.append(("ul", list(items)))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.blocks.append(("table", list(headers), [[str(c) for c in r] for r in rows]))

    def figure(self, path: Path, caption: str) -> None:
        self.blocks.append(("img", path, caption))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "ul":
                out.append("\n".join(f"- {i}" for i in b[1]))
            elif b[0] == "table":
                esc = [[c.replace("|", "\\|").replace("\n", " ") for c in r] for r in [b[1]] + b[2]]
                lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(esc[0])]
                lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
                out.append("\n".join(lines))
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1].name})\n\n*{b[2]}*")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        body = []
        for b in self.blocks:
            if b[0] == "h":
                body.append(f"<h{b[1]}>{inline(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                body.append(f"<p>{inline(b[1])}</p>")
            elif b[0] == "ul":
                body.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in b[1]) + "</ul>")
            elif b[0] == "table":
                head = "".join(f"<th>{inline(c)}</th>" for c in b[1])
                rows = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>"
                               for r in b[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif b[0] == "img":
                data = base64.b64encode(b[1].read_bytes()).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{inline(b[2])}</figcaption></figure>")
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
                + "\n".join(body) + "\n</body></html>\n")


# inline style only: the file must open offline and reference nothing outside itself
CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:0.25em 0.6em;text-align:left;vertical-align:top}
th{background:#f2f2f2}
code{background:#f4f4f4;padding:0 0.2em}
figure{margin:1.5em 0}
img{max-width:100%}
figcaption{font-style:italic;color:#555}
"""


def inline(text: str) -> str:
    """Text as HTML: escaped, `code` spans as <code>, no scheme separator left in it."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    # a scheme separator in printed text (an error message, a server URI) becomes an entity,
    # so nothing in the file looks like a reference to fetch
    return out.replace("://", "&#58;//")
