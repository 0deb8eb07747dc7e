"""bnlab's batch normalization: layers, variants, and the tools that act on them.

>>> from bnlab import nn as bnn
>>> layer = bnn.BatchNorm2d(16)              # same semantics and state_dict as torch.nn.BatchNorm2d
>>> folded, report = bnn.fold_batchnorm(model)  # eval-only copy with BN merged into Conv/Linear
"""

from bnlab.nn import functional
from bnlab.nn._backend import backend_name, set_backend
from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert, is_batchnorm
from bnlab.nn.fold import FoldReport, fold_batchnorm, population_statistics, recalibrate_batchnorm
from bnlab.nn.norms import (NORMS, WSConv2d, is_per_example_norm, norm_layer, standardize_weights,
                            swap_norm)
from bnlab.nn.sync import SyncBatchNorm, merge_moments
from bnlab.nn.variants import (BatchRenorm1d, BatchRenorm2d, GhostBatchNorm1d, GhostBatchNorm2d, NoisyBatchNorm1d,
                               NoisyBatchNorm2d)

__all__ = [
    "functional", "backend_name", "set_backend", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert", "is_batchnorm",
    "BatchRenorm1d", "BatchRenorm2d", "GhostBatchNorm1d", "GhostBatchNorm2d", "NoisyBatchNorm1d", "NoisyBatchNorm2d",
    "SyncBatchNorm", "merge_moments",
    "FoldReport", "fold_batchnorm", "population_statistics", "recalibrate_batchnorm",
    "NORMS", "WSConv2d", "is_per_example_norm", "norm_layer", "standardize_weights", "swap_norm",
]
