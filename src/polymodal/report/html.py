"""The report page: sections of one column per run (two runs sit side by side), written as one
self-contained HTML file.

Self-contained and offline: figures are PNGs and samples are WAVs inside ``data:`` URIs, the style
sheet is inline, and there is no script. The page's Content-Security-Policy allows nothing but
those (``default-src 'none'``), so a browser fetches nothing even if a future section forgot the
rule: the fetch would be blocked and logged in its console, which the browser test checks.
"""

from __future__ import annotations

import base64
import dataclasses
import html
from collections.abc import Sequence

from matplotlib.figure import Figure

from polymodal.report.figures import png_bytes

CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; media-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 2rem 3rem; color: #1d2327; background: #fff; }
header { border-bottom: 2px solid #ccd; margin-bottom: 1rem; }
nav a { margin-right: 0.9rem; font-size: 0.9rem; }
section { margin: 1.5rem 0; padding-top: 0.5rem; border-top: 1px solid #e3e6ea; }
h2 { font-size: 1.25rem; margin: 0.3rem 0; }
h3 { font-size: 1rem; margin: 0.2rem 0 0.4rem; color: #38424c; }
.runs { display: grid; grid-template-columns: repeat(var(--runs), minmax(0, 1fr)); gap: 1.5rem; }
.run { min-width: 0; }
img { max-width: 100%; height: auto; display: block; margin: 0.3rem 0; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.85rem; }
th, td { border: 1px solid #d5d9de; padding: 0.2rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f2f4f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.met { color: #13711f; font-weight: 600; }
.below { color: #b3261e; font-weight: 600; }
.note { color: #5b6670; font-size: 0.85rem; }
pre { background: #f6f8fa; padding: 0.6rem; max-height: 28rem; overflow: auto; font-size: 0.75rem; }
figure.sample { margin: 0.4rem 0; }
figcaption { font-size: 0.8rem; color: #38424c; }
"""


@dataclasses.dataclass(frozen=True)
class Section:
    """One part of the page.

    Attributes:
        id: the HTML id (the browser test looks every one up).
        title: the heading.
        intro: HTML under the heading, across the page (what the section shows).
        columns: one HTML block per run, side by side.
        footer: HTML across the page after the columns (a table comparing the runs).
    """

    id: str
    title: str
    intro: str
    columns: Sequence[str]
    footer: str = ""


def render_page(title: str, run_names: Sequence[str], sections: Sequence[Section], *, generated: str) -> str:
    """The whole HTML document."""
    nav = " ".join(f'<a href="#{s.id}">{esc(s.title)}</a>' for s in sections)
    body = "\n".join(_section(s, run_names) for s in sections)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<header>
<h1>{esc(title)}</h1>
<p class="note">{esc(generated)}</p>
<nav>{nav}</nav>
</header>
{body}
</body>
</html>
"""


def _section(section: Section, run_names: Sequence[str]) -> str:
    columns = "".join(
        f'<div class="run"><h3>{esc(name)}</h3>{content}</div>' for name, content in zip(run_names, section.columns)
    )
    return (
        f'<section id="{section.id}">\n<h2>{esc(section.title)}</h2>\n{section.intro}\n'
        f'<div class="runs" style="--runs: {len(section.columns)}">{columns}</div>\n{section.footer}\n</section>'
    )


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def figure_img(fig: Figure | None, alt: str) -> str:
    """A matplotlib figure as an embedded PNG (nothing for None)."""
    return "" if fig is None else png_img(png_bytes(fig), alt)


def png_img(data: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


def audio_player(data: bytes, caption: str) -> str:
    source = f"data:audio/wav;base64,{base64.b64encode(data).decode('ascii')}"
    return f'<figure class="sample"><audio controls preload="metadata" src="{source}"></audio><figcaption>{esc(caption)}</figcaption></figure>'


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table; ``header`` is text, cells are HTML (a cell starting ``<td`` is used as it is)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def number_cell(value: float | None, *, percent: bool = False, verdict: bool | None = None) -> str:
    """A right-aligned figure, as a percentage or to 4 significant digits, with met / below."""
    if value is None:
        return '<td class="num">-</td>'
    text = f"{100 * value:.1f}%" if percent else f"{value:.4g}"
    if verdict is not None:
        text += f' <span class="{"met" if verdict else "below"}">{"met" if verdict else "below"}</span>'
    return f'<td class="num">{text}</td>'
