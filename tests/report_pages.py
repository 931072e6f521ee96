"""Reading the report's pages in tests: a small DOM of the HTML, the text report's tables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def walk(self) -> list[Node]:
        out = [self]
        for c in self.children:
            out += c.walk()
        return out

    def find(self, tag: str | None = None, cls: str | None = None) -> list[Node]:
        return [
            n
            for n in self.walk()[1:]
            if (tag is None or n.tag == tag) and (cls is None or cls in n.classes)
        ]

    def all_text(self) -> str:
        return " ".join(" ".join([*self.text, *(c.all_text() for c in self.children)]).split())


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].text.append(data)


def parse(html: str) -> Node:
    p = _Parser()
    p.feed(html)
    p.close()
    return p.root


def by_id(doc: Node, ident: str) -> Node:
    hits = [n for n in doc.walk() if n.attrs.get("id") == ident]
    assert len(hits) == 1, f"#{ident}: {len(hits)} elements"
    return hits[0]


def table_rows(table: Node) -> list[list[str]]:
    body = table.find("tbody")[0]
    return [[td.all_text() for td in tr.find("td")] for tr in body.find("tr")]


def svg_marks(svg: Node) -> tuple[int, int]:
    """(bars drawn, bars with a non-zero size) in a pygal chart's plot series."""
    rects: list[Node] = []
    for plot in svg.find("g", "plot"):
        if plot.classes != {"plot"}:
            continue  # "plot overlay", "plot text-overlay", "plot tooltip-overlay"
        for bar in plot.find("g", "bar"):
            rects += bar.find("rect")
    # pygal leaves out a zero width/height attribute (an empty stacked segment)
    visible = [
        r
        for r in rects
        if float(r.attrs.get("width", 0)) > 0 and float(r.attrs.get("height", 0)) > 0
    ]
    return len(rects), len(visible)


def text_tables(text: str) -> dict[str, list[list[str]]]:
    """Rows (whitespace-split tokens) of each table of the text report, by title."""
    tables: dict[str, list[list[str]]] = {}
    lines = text.splitlines()
    for j, line in enumerate(lines):
        if j < 2 or set(line.strip()) != {"─"}:
            continue
        start = j - 2  # the title (rich may wrap it) is above the header line
        while start > 0 and lines[start - 1].strip():
            start -= 1
        rows = tables[" ".join(x.strip() for x in lines[start : j - 1])] = []
        for row in lines[j + 1 :]:
            if not row.strip():
                break
            rows.append(row.split())
    return tables


def chromium() -> Any:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (Debian package chromium; .ci/run installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing (pip install -e '.[test]')")
    return sync_playwright


# In the rendered page: every chart's text boxes (clipped by the <svg>? overlapping
# another?), the bottom of each verdict card and chart, and boxes wider than their
# content allows (a card, a table cell).
MEASURE_JS = """() => {
  const visible = (el) => {
    const s = getComputedStyle(el);
    return s.display !== 'none' && s.visibility !== 'hidden' && el.textContent.trim() !== '';
  };
  const charts = {};
  for (const svg of document.querySelectorAll('svg[id^="chart-"]')) {
    const box = svg.getBoundingClientRect();
    const texts = [...svg.querySelectorAll('text')].filter(visible).map((t) => {
      const r = t.getBoundingClientRect();
      return {text: t.textContent.trim(), x0: r.left, y0: r.top, x1: r.right, y1: r.bottom};
    });
    const clipped = texts.filter((r) => r.x0 < box.left - 0.5 || r.x1 > box.right + 0.5
      || r.y0 < box.top - 0.5 || r.y1 > box.bottom + 0.5).map((r) => r.text);
    const overlaps = [];
    for (let i = 0; i < texts.length; i++) {
      for (let j = i + 1; j < texts.length; j++) {
        const a = texts[i], b = texts[j];
        const w = Math.min(a.x1, b.x1) - Math.max(a.x0, b.x0);
        const h = Math.min(a.y1, b.y1) - Math.max(a.y0, b.y0);
        if (w > 1 && h > 1) overlaps.push([a.text, b.text]);
      }
    }
    const figure = svg.closest('figure') || svg;
    charts[svg.id] = {texts: texts.length, clipped, overlaps,
                      bottom: figure.getBoundingClientRect().bottom + window.scrollY};
  }
  const cards = [...document.querySelectorAll('#readiness .verdict')].map(
    (c) => c.getBoundingClientRect().bottom + window.scrollY);
  const overflowing = [...document.querySelectorAll('.verdict, .verdict *, td, th, caption')]
    .filter((el) => el.scrollWidth > el.clientWidth + 1)
    .map((el) => el.tagName + ': ' + el.textContent.trim().slice(0, 40));
  return {charts, cards, overflowing, page_width: document.documentElement.scrollWidth};
}"""


def measure_page(path: Path, width: int, height: int) -> dict[str, Any]:
    """MEASURE_JS's findings for a page opened in headless Chromium at width × height."""
    sync_playwright = chromium()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(path.resolve().as_uri(), wait_until="load")
            result: dict[str, Any] = page.evaluate(MEASURE_JS)
        finally:
            browser.close()
    return result
