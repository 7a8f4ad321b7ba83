"""InfoNCE contrastive loss for PyTorch."""

from info_nce._version import __version__
from info_nce.cache import grad_cache
from info_nce.functional import info_nce, nt_xent, siglip_loss
from info_nce.module import InfoNCE, NTXent, SigLIPLoss
from info_nce.queue import MemoryQueue

__all__ = [
    "InfoNCE",
    "MemoryQueue",
    "NTXent",
    "SigLIPLoss",
    "__version__",
    "grad_cache",
    "info_nce",
    "nt_xent",
    "siglip_loss",
]
