"""The `info-nce` command line: the only part of the package that imports its extras."""
