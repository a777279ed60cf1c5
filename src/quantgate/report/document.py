"""A report as a list of sections of blocks, rendered to a self-contained HTML page or to its
Markdown twin from the same content (so the two never disagree)."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field


@dataclass
class Paragraph:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    # Per-row CSS class ("pass", "fail", "skip") for HTML; Markdown shows the text only.
    row_classes: list[str] = field(default_factory=list)


@dataclass
class Figure:
    svg: str  # an inline <svg> element
    caption: str


@dataclass
class Image:
    data_uri: str  # data:image/png;base64,...
    caption: str


Block = Paragraph | Bullets | Table | Figure | Image


@dataclass
class Section:
    title: str
    blocks: list[Block]


@dataclass
class Document:
    title: str
    sections: list[Section]


_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #1f2328; line-height: 1.45; }
h1 { font-size: 1.6rem; border-bottom: 2px solid #d0d7de; padding-bottom: .3rem; }
h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: .6rem 0 1rem; font-size: .85rem; }
th, td { border: 1px solid #d0d7de; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.pass td:first-child { border-left: 4px solid #1a7f37; }
tr.fail td { background: #ffebe9; } tr.fail td:first-child { border-left: 4px solid #cf222e; }
tr.skip td { color: #57606a; } tr.skip td:first-child { border-left: 4px solid #bf8700; }
figure { margin: 1rem 0; } figcaption { font-size: .85rem; color: #57606a; }
figure svg, figure img { max-width: 100%; height: auto; }
code { background: #f6f8fa; padding: 0 .2rem; }
"""


_NUMERIC = re.compile(r"^[-+]?[\d.,]+(e[-+]?\d+)?\s*(x|%|s|GiB|MiB|ms|dB)?(\s*–\s*[-+]?[\d.,]+(e[-+]?\d+)?)?$|^–$")


def _is_number(text: str) -> bool:
    """Whether a cell holds a number (right-aligned): 1.23, 4.5x, 12%, 0.1 – 0.2, or a dash."""
    return bool(_NUMERIC.match(text.strip()))


def to_html(doc: Document) -> str:
    """A self-contained HTML page: inline CSS, inline SVG, no external requests."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(doc.title)}</title>", f"<style>{_CSS}</style></head><body>",
           f"<h1>{html.escape(doc.title)}</h1>"]
    for section in doc.sections:
        slug = "".join(c if c.isalnum() else "-" for c in section.title.lower()).strip("-")
        out.append(f'<section id="{slug}"><h2>{html.escape(section.title)}</h2>')
        for block in section.blocks:
            if isinstance(block, Paragraph):
                out.append(f"<p>{html.escape(block.text)}</p>")
            elif isinstance(block, Bullets):
                out.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in block.items) + "</ul>")
            elif isinstance(block, Table):
                out.append("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
                           + "</tr></thead><tbody>")
                for index, row in enumerate(block.rows):
                    cls = block.row_classes[index] if index < len(block.row_classes) else ""
                    cells = "".join(f'<td class="num">{html.escape(c)}</td>' if _is_number(c) else
                                    f"<td>{html.escape(c)}</td>" for c in row)
                    out.append(f'<tr class="{cls}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
                out.append("</tbody></table>")
            elif isinstance(block, Figure):
                out.append(f"<figure>{block.svg}<figcaption>{html.escape(block.caption)}</figcaption></figure>")
            elif isinstance(block, Image):
                out.append(f'<figure><img src="{block.data_uri}" alt="{html.escape(block.caption)}">'
                           f"<figcaption>{html.escape(block.caption)}</figcaption></figure>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: Document) -> str:
    """The Markdown twin: the same sections, tables and text; figures by caption."""
    out = [f"# {doc.title}", ""]
    for section in doc.sections:
        out += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Paragraph):
                out += [block.text, ""]
            elif isinstance(block, Bullets):
                out += [f"- {item}" for item in block.items] + [""]
            elif isinstance(block, Table):
                out.append("| " + " | ".join(_md_cell(h) for h in block.headers) + " |")
                out.append("|" + "|".join("---:" if all(_is_number(r[i]) for r in block.rows if i < len(r)) and block.rows
                                          else "---" for i in range(len(block.headers))) + "|")
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
                out.append("")
            elif isinstance(block, (Figure, Image)):
                out += [f"*Figure (in the HTML report): {block.caption}*", ""]
    return "\n".join(out).rstrip() + "\n"
