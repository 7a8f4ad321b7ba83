"""Which implementation runs an objective's body: Triton kernels or PyTorch ops.

``INFO_NCE_BACKEND`` chooses, read at each call (so a process may switch):

* ``auto`` (the default): the Triton kernels on CUDA tensors when Triton
  imports, PyTorch ops otherwise;
* ``triton``: the kernels on every tensor; CPU tensors need Triton's
  interpreter (``TRITON_INTERPRET=1`` set before the first kernel is used),
  which is how the tests run them without a GPU;
* ``torch``: PyTorch ops everywhere.

This package imports Triton on a kernel's first use only (torch itself
may import it where it is installed). Where it is missing or too old, the
ops run instead, with one warning.
"""

from __future__ import annotations

import functools
import os
import warnings
from types import ModuleType

from torch import Tensor

ENVIRONMENT = "INFO_NCE_BACKEND"
BACKENDS = ("auto", "triton", "torch")
MIN_TRITON = (3, 2)  # the oldest Triton the kernels are written for


def backend() -> str:
    """``INFO_NCE_BACKEND``'s value ('auto' when unset).

    Raises:
        ValueError: another value.
    """
    value = os.environ.get(ENVIRONMENT, "auto")
    if value not in BACKENDS:
        raise ValueError(
            f"{ENVIRONMENT} must be one of {', '.join(repr(b) for b in BACKENDS)}, got {value!r}"
        )
    return value


@functools.cache
def _kernels() -> ModuleType | None:
    """`info_nce.kernels` (importing Triton), or None with one warning where it cannot."""
    try:
        import triton
    except ImportError as error:
        reason = f"Triton does not import ({error})"
    else:
        version = tuple(int(part) for part in triton.__version__.split(".")[:2])
        if version >= MIN_TRITON:
            from info_nce import kernels

            return kernels
        reason = f"Triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}"
    warnings.warn(
        f"info_nce runs its PyTorch ops instead of its Triton kernels: {reason}",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def kernels_for(tensor: Tensor) -> ModuleType | None:
    """The kernels module to run on ``tensor``, or None for the PyTorch ops.

    Raises:
        ValueError: ``INFO_NCE_BACKEND`` is not a known value; or it is
            'triton' for a CPU tensor without ``TRITON_INTERPRET=1``.
    """
    chosen = backend()
    if chosen == "torch" or (chosen == "auto" and not tensor.is_cuda):
        return None
    if chosen == "triton" and not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"{ENVIRONMENT}='triton' on a {tensor.device.type} tensor needs Triton's "
            "interpreter: set TRITON_INTERPRET=1 before the first kernel runs "
            f"(or {ENVIRONMENT}='auto' for the PyTorch ops off CUDA)"
        )
    return _kernels()
