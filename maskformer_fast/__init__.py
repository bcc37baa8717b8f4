"""maskformer_fast: exact batched Hungarian matching, fused matching-cost kernels and a
MaskFormer trainer for set-prediction training.

The drop-in is :mod:`maskformer_fast.hungarian` (the solver and the matchers); the solver's
names are here too, without the matchers' imports."""

from maskformer_fast.lsa import (
    BatchAssignment,
    Status,
    batch_linear_sum_assignment,
    linear_sum_assignment,
)

__version__ = "0.1.0"
__all__ = ["BatchAssignment", "Status", "batch_linear_sum_assignment", "linear_sum_assignment"]
