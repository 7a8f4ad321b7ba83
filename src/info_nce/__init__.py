"""InfoNCE contrastive loss for PyTorch."""

from info_nce._version import __version__
from info_nce.functional import info_nce
from info_nce.module import InfoNCE

__all__ = ["InfoNCE", "__version__", "info_nce"]
