"""maskformer_fast: exact batched Hungarian matching, fused matching-cost kernels and a
MaskFormer trainer for set-prediction training."""

from maskformer_fast.hungarian import (
    BatchAssignment,
    batch_linear_sum_assignment,
    linear_sum_assignment,
)

__version__ = "0.1.0"
__all__ = ["BatchAssignment", "batch_linear_sum_assignment", "linear_sum_assignment"]
