"""Column tiles at test sizes: shrink the walker's block limits so long rows are tiled.

The engine splits rows into column tiles only when a block of complete rows
would hold fewer than `walker.MIN_TILED_ROWS` rows, which at the real limits
takes hundreds of thousands of keys. `column_tiles` lowers the limits so that
``chunk_size=None`` takes the engine (not the dense loss) and walks blocks of
``rows`` rows against tiles of ``tile`` columns wherever rows are longer than
``tile`` columns and the objective allows tiles.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any
from unittest import mock

import pytest

import info_nce.functional as functional
from info_nce.engine import walker


@contextmanager
def column_tiles(rows: int, tile: int) -> Iterator[list[int | None]]:
    """Within: blocks of ``rows`` rows against ``tile`` columns. Yields each walk's tile width."""
    seen: list[int | None] = []
    original = walker.statistics_pass

    def spy(*args: Any, **kwargs: Any) -> walker.BlockPass:
        layout: walker.Layout = args[4]
        seen.append(layout.tile_columns)
        return original(*args, **kwargs)

    with ExitStack() as stack:
        stack.enter_context(
            mock.patch.multiple(
                walker,
                MIN_BLOCK_ROWS=rows,
                MIN_TILED_ROWS=rows,
                TARGET_BLOCK_ELEMENTS=rows * tile,
                MAX_BLOCK_ELEMENTS=rows * tile,
                ACCELERATOR_BLOCK_SCALE=1,
                ACCELERATOR_ROW_SCALE=1,
            )
        )
        stack.enter_context(
            mock.patch.multiple(
                functional,
                DENSE_MAX_LOGITS=-1,
                DENSE_MAX_PAIRED_ELEMENTS=-1,
                SIGLIP_DENSE_MAX_LOGITS=-1,
            )
        )
        stack.enter_context(mock.patch.object(walker, "statistics_pass", spy))
        yield seen


TILES_PATH = "tiles"  # a test parameter ``path`` with this value runs on column tiles


@contextmanager
def on_path(path: str) -> Iterator[None]:
    """Run the losses within on ``path``: `TILES_PATH` walks 3 rows against 5-column tiles."""
    if path != TILES_PATH:
        yield
        return
    with column_tiles(rows=3, tile=5) as walks:
        yield
    assert walks, "the engine did not run"


@pytest.fixture(autouse=True)
def tiles_on_path(request: pytest.FixtureRequest) -> Iterator[None]:
    """Autouse where imported: a test parametrised by ``path`` runs on it (`on_path`)."""
    callspec = getattr(request.node, "callspec", None)
    with on_path(callspec.params.get("path", "") if callspec else ""):
        yield
