"""Every Python block of the documentation site and of the README runs, as written.

A page's blocks run in order in one namespace, as a reader follows the page, with the
global random generator seeded (twice: with seed 0 and seed 1, so that no claim holds
only for one draw). A block's own ``assert`` lines are its checks (the
migration page asserts its equalities that way). A block that only includes a file
(``--8<-- "path"``, rendered as that file) must name a file that another test runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import torch
from peers import peer_packages
from test_functional import SEED_README_EXAMPLES

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]

# A fenced block, possibly indented (inside a tab or an admonition): its language, its
# attributes ({ title="..." }) and its body.
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)(?P<attrs>[^\n]*)\n"
    r"(?P<body>.*?)^(?P=indent)```[ \t]*$",
    flags=re.M | re.S,
)
INCLUDE = re.compile(r'^-{2}8<-{2}\s+"(?P<path>[^"]+)"$')

# Files that pages include whole, and the test that runs each.
INCLUDED_FILES = {
    "examples/torchrun_example.py": "tests/test_distributed.py::test_torchrun_example_runs",
}


@dataclass(frozen=True)
class Block:
    """One fenced Python block: where it is, and its source, dedented."""

    page: Path
    line: int
    source: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    @property
    def included_file(self) -> str | None:
        match = INCLUDE.match(self.source.strip())
        return match["path"] if match else None


def python_blocks(page: Path) -> list[Block]:
    text = page.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        if match["lang"] != "python":
            continue
        indent = len(match["indent"])
        body = "".join(line[indent:] for line in match["body"].splitlines(keepends=True))
        blocks.append(Block(page, text.count("\n", 0, match.start()) + 2, body))
    return blocks


def run_block(block: Block, namespace: dict[str, object], seed: int) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        exec(compile(block.source, block.where, "exec"), namespace)


def run_page(blocks: list[Block], seed: int = 0) -> dict[str, object]:
    namespace: dict[str, object] = {"__name__": "__docs__"}
    with peer_packages():
        for block in blocks:
            if block.included_file is None:
                run_block(block, namespace, seed)
    return namespace


def blocks_under(page: Path, heading: str) -> list[Block]:
    """The Python blocks of the section that starts at ``heading`` (a whole line)."""
    text = page.read_text()
    start = text.index(f"\n{heading}\n")
    level = heading.split(" ")[0]
    ends = [m.start() for m in re.finditer(r"^#+ ", text[start + 1 :], flags=re.M)]
    end = len(text)
    for offset in ends[1:]:
        if len(text[start + 1 + offset :].split(" ")[0]) <= len(level):
            end = start + 1 + offset
            break
    first, last = text.count("\n", 0, start), text.count("\n", 0, end)
    return [block for block in python_blocks(page) if first < block.line <= last + 1]


CODE_PAGES = [page for page in PAGES if python_blocks(page)]


def test_the_parser_finds_every_python_fence() -> None:
    for page in PAGES:
        opened = len(re.findall(r"^[ \t]*```python\b", page.read_text(), flags=re.M))
        assert len(python_blocks(page)) == opened, f"{page}: a python fence was not parsed"


def test_the_guides_and_the_readme_have_code() -> None:
    names = {page.relative_to(REPO).as_posix() for page in CODE_PAGES}
    guides = {page.relative_to(REPO).as_posix() for page in (DOCS / "guides").glob("*.md")}
    assert guides, "docs/guides has no page"
    assert guides <= names, f"guides without a Python example: {sorted(guides - names)}"
    assert "README.md" in names


# A reader's random numbers are not the tests': a block's claims must hold for other draws.
@pytest.mark.parametrize("seed", [0, 1], ids=["seed0", "seed1"])
@pytest.mark.parametrize("page", CODE_PAGES, ids=[str(p.relative_to(REPO)) for p in CODE_PAGES])
def test_page_python_blocks_run(page: Path, seed: int) -> None:
    blocks = python_blocks(page)
    for block in blocks:
        if block.included_file is not None:
            assert block.source.strip().count("\n") == 0, f"{block.where}: an include stands alone"
            assert block.included_file in INCLUDED_FILES, (
                f"{block.where} includes {block.included_file}, which no test runs: add it to "
                "INCLUDED_FILES with the test that does"
            )
            assert (REPO / block.included_file).is_file(), block.where
    namespace = run_page(blocks, seed)
    tensors = [value for value in namespace.values() if isinstance(value, torch.Tensor)]
    assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


# What a page's code column shows without scrolling in a 1280-pixel window;
# info-nce-pytorch's examples, quoted verbatim, are exempt.
MAX_LINE = 80


VERBATIM = {code.strip() for code in SEED_README_EXAMPLES.values()}


def test_code_lines_fit_the_page() -> None:
    long = []
    for page in PAGES:
        text = page.read_text()
        for fence in FENCE.finditer(text):
            if fence["body"].strip() in VERBATIM:
                continue
            first = text.count("\n", 0, fence.start()) + 2
            for n, line in enumerate(fence["body"].splitlines()):
                width = len(line) - len(fence["indent"])
                if width > MAX_LINE:
                    long.append(f"{page.relative_to(REPO)}:{first + n} has {width} characters")
    assert not long, f"lines longer than {MAX_LINE} characters: {long}"


def test_the_two_tower_guide_shows_info_nce_pytorchs_examples() -> None:
    sources = {block.source.strip() for block in python_blocks(DOCS / "guides" / "two-tower.md")}
    missing = [name for name, code in SEED_README_EXAMPLES.items() if code.strip() not in sources]
    assert not missing, f"the two-tower guide lacks info-nce-pytorch's README examples: {missing}"


def test_the_info_nce_pytorch_migration_runs_on_both_packages(
    info_nce_pytorch: types.ModuleType,
) -> None:
    blocks = blocks_under(DOCS / "migrating.md", "## From info-nce-pytorch")
    assert blocks, "the migration page has no info-nce-pytorch section with code"
    ours = run_page(blocks)
    with mock.patch.dict(sys.modules, {"info_nce": info_nce_pytorch}):
        theirs = run_page(blocks)
    assert theirs["InfoNCE"] is info_nce_pytorch.InfoNCE
    assert ours["InfoNCE"] is not info_nce_pytorch.InfoNCE
    for name in ("output", "query"):
        assert isinstance(ours[name], torch.Tensor), name
        assert isinstance(theirs[name], torch.Tensor), name
    torch.testing.assert_close(ours["output"], theirs["output"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours["query"].grad, theirs["query"].grad, rtol=1e-5, atol=1e-7)


def test_the_built_site_loads_nothing_from_the_web(tmp_path: Path) -> None:
    # `make docs` builds with --strict in CI; this build checks what the pages load: the
    # theme's own assets only (no web font, no CDN script), so the site reads offline.
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert build.returncode == 0, build.stderr
    remote = re.compile(r"<(?:link|script|img)\b[^>]*\b(?:href|src)=\"(?:https?:)?//", re.I)
    pages = sorted(site.rglob("*.html"))
    assert len(pages) >= len(list(DOCS.rglob("*.md")))
    loading = [str(p.relative_to(site)) for p in pages if remote.search(p.read_text())]
    assert not loading, f"pages that load from the web: {loading}"


def test_the_readmes_links_reach_files() -> None:
    # The README is read on its own (GitHub, PyPI), outside the site's link checks.
    text = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\((?!https?://|#)([^)#\s]+)", text)
    assert targets, "the README links to no page of the docs"
    missing = [target for target in targets if not (REPO / target).exists()]
    assert not missing, f"README links to missing files: {missing}"
