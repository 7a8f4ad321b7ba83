"""Triton kernels: the objectives' bodies on a block of logits, one program per row.

Imported only by `info_nce._backend`, which imports Triton first; an
objective calls its kernels where the backend chooses them
(``INFO_NCE_BACKEND``) and its PyTorch ops otherwise. A kernel computes what
the objective's ops compute, in the block's precision (float32 at least),
in place.
"""

from info_nce.kernels.debiased import dual_gradient_, dual_lse
from info_nce.kernels.infonce import (
    column_exp_sums,
    column_sums,
    infonce_forward_,
    infonce_forward_gradient_,
    infonce_gradient_,
)
from info_nce.kernels.sigmoid import sigmoid_rows_

__all__ = [
    "column_exp_sums",
    "column_sums",
    "dual_gradient_",
    "dual_lse",
    "infonce_forward_",
    "infonce_forward_gradient_",
    "infonce_gradient_",
    "sigmoid_rows_",
]
