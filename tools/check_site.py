"""Open the built site in headless Chromium and check what a reader sees.

For the home page and one guide, Chromium loads the page from disk, runs its scripts
and dumps the resulting DOM; the page's main heading and its first code block must be
there, equal to the first heading and the first code block of the page's Markdown
source. A screenshot of each page is written into the site's folder, for a person to
look at.

    python tools/check_site.py site          # after `mkdocs build` (`make docs-check`)

Needs Debian's ``chromium`` package (``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = {"index.html": "docs/index.md", "guides/two-tower.html": "docs/guides/two-tower.md"}


class _Reader(HTMLParser):
    """The text of the article's first <h1> and of its first <pre> code block."""

    def __init__(self) -> None:
        super().__init__()
        self.heading: str | None = None
        self.code: str | None = None
        self._in_article = False
        self._capture: str | None = None
        self._skip = 0
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = dict(attrs).get("class") or ""
        if tag == "article":
            self._in_article = True
        elif not self._in_article or self._capture is not None:
            if self._capture is not None and tag in ("a", "button") and "headerlink" in classes:
                self._skip += 1
        elif tag == "h1" and self.heading is None:
            self._capture, self._text = "h1", []
        elif tag == "pre" and self.code is None:
            self._capture, self._text = "pre", []

    def handle_endtag(self, tag: str) -> None:
        if self._skip and tag in ("a", "button"):
            self._skip -= 1
        elif tag == self._capture:
            text = "".join(self._text)
            if tag == "h1":
                self.heading = text.strip()
            else:
                self.code = text
            self._capture = None

    def handle_data(self, data: str) -> None:
        if self._capture is not None and not self._skip:
            self._text.append(data)


def expected(markdown: Path) -> tuple[str, str]:
    """The first H1 and the first fenced code block of a Markdown page."""
    text = markdown.read_text()
    heading = re.search(r"^# (.+)$", text, flags=re.M)
    code = re.search(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
    if heading is None or code is None:
        raise SystemExit(f"{markdown}: no '# heading' or no code block to look for")
    # The rendered heading drops Markdown's code marks.
    return heading[1].replace("`", "").strip(), code[1]


def render(chromium: str, page: Path, screenshot: Path) -> str:
    """The DOM of ``page`` after Chromium has run its scripts; a screenshot on the side."""
    url = page.resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        common = [chromium, "--headless", "--no-sandbox", "--disable-gpu",
                  f"--user-data-dir={profile}", "--window-size=1280,1600"]  # fmt: skip
        subprocess.run(
            [*common, f"--screenshot={screenshot}", url],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        dom = subprocess.run(
            [*common, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120
        )
    return dom.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("site", type=Path, help="the built site's folder (mkdocs' site_dir)")
    parser.add_argument("--chromium", default="chromium", help="the browser (default chromium)")
    parser.add_argument(
        "--screenshots", type=Path, default=None, help="where to write PNGs (default: SITE)"
    )
    args = parser.parse_args(argv)
    chromium = shutil.which(args.chromium)
    if chromium is None:
        print(f"{args.chromium} not found: apt-get install chromium", file=sys.stderr)
        return 2
    shots = args.screenshots or args.site.resolve()
    failures = 0
    for html, markdown in PAGES.items():
        heading, code = expected(REPO / markdown)
        screenshot = shots / f"site-{html.replace('/', '-').removesuffix('.html')}.png"
        reader = _Reader()
        reader.feed(render(chromium, args.site / html, screenshot))
        problems = []
        if reader.heading != heading:
            problems.append(f"main heading {reader.heading!r}, expected {heading!r}")
        if reader.code is None or reader.code.strip() != code.strip():
            problems.append(f"first code block {reader.code!r}, expected {code!r}")
        if not screenshot.is_file() or screenshot.stat().st_size == 0:
            problems.append(f"no screenshot at {screenshot}")
        status = "FAIL" if problems else "ok"
        print(f"{status:4} {html}: heading {reader.heading!r}; screenshot {screenshot}")
        for problem in problems:
            print(f"     {problem}")
        failures += bool(problems)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
