"""Bad input gets a clear error (issue 2, item 3), never a crash deep inside torch.

One case per kind of bad input: the exception type (TypeError for a wrong type
or dtype, ValueError for the rest) and a message that names the argument and
shows the value given. Inputs are checked at the call, on `info_nce` and on
`InfoNCE.forward`; settings are checked by `info_nce` and by the module's
constructor. Where info-nce-pytorch had a message its wording is matched too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from info_nce import InfoNCE, info_nce

B, D, M = 4, 3, 5


def randn(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype).to(device)


def call_functional(*inputs: Any, **settings: Any) -> Tensor:
    return info_nce(*inputs, **settings)


def call_module(*inputs: Any, **settings: Any) -> Tensor:
    return InfoNCE(**settings)(*inputs)


ENTRY_POINTS = [
    pytest.param(call_functional, id="info_nce"),
    pytest.param(call_module, id="InfoNCE"),
]


def inputs_case(
    make: Callable[[], tuple[Any, ...]],
    error: type[Exception],
    pattern: str,
    *,
    negative_mode: str = "unpaired",
    case_id: str,
) -> Any:
    return pytest.param(make, negative_mode, error, pattern, id=case_id)


# (inputs, negative_mode, exception, regex naming the argument and the value given)
BAD_INPUTS = [
    # Wrong number of dimensions.
    inputs_case(
        lambda: (randn(B), randn(B, D)),
        ValueError,
        r"<query> must have 2 dimensions.*got 1 with shape \(4,\)",
        case_id="query-1d",
    ),
    inputs_case(
        lambda: (randn(B, D, 2), randn(B, D)),
        ValueError,
        r"<query> must have 2 dimensions.*got 3 with shape \(4, 3, 2\)",
        case_id="query-3d",
    ),
    inputs_case(
        lambda: (randn(B, D), randn(B, D, 1)),
        ValueError,
        r"<positive_key> must have 2 dimensions.*got 3 with shape \(4, 3, 1\)",
        case_id="positive_key-3d",
    ),
    inputs_case(
        lambda: (randn(B, D), randn(B, D), randn(B, M, D)),
        ValueError,
        r"<negative_keys> must have 2 dimensions if <negative_mode> == 'unpaired'"
        r".*got 3 with shape \(4, 5, 3\)",
        case_id="unpaired-negative_keys-3d",
    ),
    inputs_case(
        lambda: (randn(B, D), randn(B, D), randn(M, D)),
        ValueError,
        r"<negative_keys> must have 3 dimensions if <negative_mode> == 'paired'"
        r".*got 2 with shape \(5, 3\)",
        negative_mode="paired",
        case_id="paired-negative_keys-2d",
    ),
    # Mismatched batch sizes.
    inputs_case(
        lambda: (randn(B, D), randn(B + 1, D)),
        ValueError,
        r"<query> and <positive_key> must have the same number of samples.*got 4 and 5",
        case_id="positive_key-batch",
    ),
    inputs_case(
        lambda: (randn(B, D), randn(B, D), randn(B + 2, M, D)),
        ValueError,
        r"If negative_mode == 'paired', then <negative_keys> must have the same number of "
        r"samples as <query>.*got 6 and 4",
        negative_mode="paired",
        case_id="paired-negative_keys-batch",
    ),
    # Mismatched embedding sizes.
    inputs_case(
        lambda: (randn(B, D), randn(B, D + 1)),
        ValueError,
        r"Vectors of <query> and <positive_key> should have the same number of components"
        r".*got 3 and 4",
        case_id="positive_key-dim",
    ),
    inputs_case(
        lambda: (randn(B, D), randn(B, D), randn(M, D + 2)),
        ValueError,
        r"Vectors of <query> and <negative_keys> should have the same number of components"
        r".*got 3 and 5",
        case_id="unpaired-negative_keys-dim",
    ),
    inputs_case(
        lambda: (randn(B, D), randn(B, D), randn(B, M, D + 2)),
        ValueError,
        r"Vectors of <query> and <negative_keys> should have the same number of components"
        r".*got 3 and 5",
        negative_mode="paired",
        case_id="paired-negative_keys-dim",
    ),
    # Empty batch, zero-width embeddings.
    inputs_case(
        lambda: (randn(0, D), randn(0, D)),
        ValueError,
        r"<query> must hold at least one sample.*got shape \(0, 3\)",
        case_id="empty-batch",
    ),
    inputs_case(
        lambda: (randn(B, 0), randn(B, 0)),
        ValueError,
        r"<query> must have at least one component.*got shape \(4, 0\)",
        case_id="zero-width",
    ),
    # Integer and bool tensors.
    inputs_case(
        lambda: (torch.ones(B, D, dtype=torch.int64), randn(B, D)),
        TypeError,
        r"<query> must be a floating-point tensor.*got dtype torch\.int64",
        case_id="query-int64",
    ),
    inputs_case(
        lambda: (randn(B, D), torch.ones(B, D, dtype=torch.bool)),
        TypeError,
        r"<positive_key> must be a floating-point tensor.*got dtype torch\.bool",
        case_id="positive_key-bool",
    ),
    inputs_case(
        lambda: (randn(B, D), randn(B, D), torch.ones(M, D, dtype=torch.int64)),
        TypeError,
        r"<negative_keys> must be a floating-point tensor.*got dtype torch\.int64",
        case_id="negative_keys-int64",
    ),
    # Not tensors at all.
    inputs_case(
        lambda: ([[1.0, 2.0]] * B, randn(B, 2)),
        TypeError,
        r"<query> must be a torch\.Tensor, got list",
        case_id="query-list",
    ),
    inputs_case(
        lambda: (randn(B, 2), [[1.0, 2.0]] * B),
        TypeError,
        r"<positive_key> must be a torch\.Tensor, got list",
        case_id="positive_key-list",
    ),
    inputs_case(
        lambda: (randn(B, 2), randn(B, 2), [[1.0, 2.0]] * M),
        TypeError,
        r"<negative_keys> must be a torch\.Tensor, got list",
        case_id="negative_keys-list",
    ),
    # Different dtypes.
    inputs_case(
        lambda: (randn(B, D), randn(B, D, dtype=torch.float64)),
        TypeError,
        r"<positive_key> must have the same dtype as <query> \(torch\.float32\), "
        r"got torch\.float64",
        case_id="positive_key-dtype",
    ),
    inputs_case(
        lambda: (randn(B, D), randn(B, D), randn(M, D, dtype=torch.float16)),
        TypeError,
        r"<negative_keys> must have the same dtype as <query> \(torch\.float32\), "
        r"got torch\.float16",
        case_id="negative_keys-dtype",
    ),
    # Different devices: the meta device needs no hardware.
    inputs_case(
        lambda: (randn(B, D), torch.empty(B, D, device="meta")),
        ValueError,
        r"<positive_key> must be on the same device as <query> \(cpu\), got meta",
        case_id="positive_key-device",
    ),
    inputs_case(
        lambda: (torch.empty(B, D, device="meta"), randn(B, D)),
        ValueError,
        r"<positive_key> must be on the same device as <query> \(meta\), got cpu",
        case_id="query-device",
    ),
    inputs_case(
        lambda: (randn(B, D), randn(B, D), torch.empty(B, M, D, device="meta")),
        ValueError,
        r"<negative_keys> must be on the same device as <query> \(cpu\), got meta",
        negative_mode="paired",
        case_id="negative_keys-device",
    ),
]


@pytest.mark.parametrize("call", ENTRY_POINTS)
@pytest.mark.parametrize(("make", "negative_mode", "error", "pattern"), BAD_INPUTS)
def test_bad_input_raises_naming_the_argument(
    call: Callable[..., Tensor],
    make: Callable[[], tuple[Any, ...]],
    negative_mode: str,
    error: type[Exception],
    pattern: str,
) -> None:
    inputs = make()
    with pytest.raises(error, match=pattern) as raised:
        call(*inputs, negative_mode=negative_mode)
    assert "must must" not in str(raised.value)  # the seed's typo


def test_meta_tensors_are_real_tensors_on_another_device() -> None:
    # The device cases above rely on this; they need no accelerator.
    meta = torch.empty(B, D, device="meta")
    assert meta.device.type == "meta"
    assert meta.device != torch.device("cpu")


# --- Settings: at the call and at construction ---------------------------------


def bad_setting(name: str, value: object, error: type[Exception], shown: str) -> Any:
    """A bad value of setting `name`: the message names it and shows `shown`."""
    return pytest.param(name, value, error, rf"{name}\b.*got {shown}$", id=f"{name}={value!r}")


BAD_SETTINGS = [
    bad_setting("negative_mode", "pair", ValueError, "'pair'"),
    bad_setting("negative_mode", None, ValueError, "None"),
    bad_setting("reduction", "avg", ValueError, "'avg'"),
    bad_setting("reduction", None, ValueError, "None"),
    bad_setting("temperature", 0, ValueError, "0"),
    bad_setting("temperature", 0.0, ValueError, r"0\.0"),
    bad_setting("temperature", -1, ValueError, "-1"),
    bad_setting("temperature", math.nan, ValueError, "nan"),
    bad_setting("temperature", math.inf, ValueError, "inf"),
    bad_setting("temperature", "0.1", TypeError, r"str '0\.1'"),
    bad_setting("temperature", True, TypeError, "bool True"),
    bad_setting("chunk_size", 0, ValueError, "0"),
    bad_setting("chunk_size", -1, ValueError, "-1"),
    bad_setting("chunk_size", 1.5, ValueError, r"1\.5"),
    bad_setting("chunk_size", True, ValueError, "True"),
    bad_setting("chunk_size", "4", ValueError, "'4'"),
]


@pytest.mark.parametrize("with_negatives", [False, True], ids=["no-negatives", "negatives"])
@pytest.mark.parametrize(("setting", "value", "error", "pattern"), BAD_SETTINGS)
def test_bad_setting_raises_at_the_call(
    setting: str, value: object, error: type[Exception], pattern: str, with_negatives: bool
) -> None:
    # Checked whether or not negative keys make the setting matter.
    inputs = (randn(B, D), randn(B, D), *([randn(M, D)] if with_negatives else []))
    with pytest.raises(error, match=pattern):
        info_nce(*inputs, **{setting: value})


@pytest.mark.parametrize(("setting", "value", "error", "pattern"), BAD_SETTINGS)
def test_bad_setting_raises_at_module_construction(
    setting: str, value: object, error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        InfoNCE(**{setting: value})


@pytest.mark.parametrize("value", [0, -0.5, math.nan, "0.1"])
def test_module_rejects_a_bad_temperature_assigned_later(value: object) -> None:
    loss = InfoNCE(temperature=0.5)
    with pytest.raises((ValueError, TypeError), match=re.escape(repr(value))):
        loss.temperature = value  # type: ignore[assignment]
    assert loss.temperature == 0.5


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 1e-3},
        {"temperature": 7},
        {"reduction": "none"},
        {"negative_mode": "paired"},
        {"chunk_size": 1},
        {"chunk_size": None},
    ],
    ids=str,
)
def test_good_settings_are_accepted(settings: dict[str, Any]) -> None:
    # The checks reject only what they should: edge-of-range values pass.
    module = InfoNCE(**settings)
    for name, value in settings.items():
        assert getattr(module, name) == value
    negatives = randn(B, M, D) if settings.get("negative_mode") == "paired" else None
    loss = info_nce(randn(B, D), randn(B, D), negatives, **settings)
    assert torch.isfinite(loss).all()
