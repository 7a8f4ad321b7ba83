"""Adapters of `info_nce` to other libraries' interfaces (each imports its library)."""
