"""bnlab — a batch-normalization laboratory on PyTorch.

Layers live in :mod:`bnlab.nn`, data in :mod:`bnlab.data`. Everything the ``bnlab`` command does
is a call into this package that a notebook can make too.
"""

__version__ = "0.1.0"

from bnlab.errors import BnlabError  # noqa: E402

__all__ = ["BnlabError", "__version__"]
