"""The drop-in: scipy's ``linear_sum_assignment``, its batched form, and the matchers.

One import swaps a trainer's matching::

    from maskformer_fast.hungarian import linear_sum_assignment        # scipy's, exactly
    from maskformer_fast.hungarian import batch_linear_sum_assignment  # B problems, one call
    from maskformer_fast.hungarian import HungarianMatcher             # MaskFormer / Mask2Former

A facade: the solver lives in :mod:`maskformer_fast.lsa`, the matchers in
:mod:`maskformer_fast.matcher` (which uses the solver); this module only re-exports them.

    >>> from maskformer_fast.hungarian import linear_sum_assignment
    >>> row_ind, col_ind = linear_sum_assignment([[4, 1, 3], [2, 0, 5], [3, 2, 2]])
    >>> row_ind.tolist(), col_ind.tolist()
    ([0, 1, 2], [1, 0, 2])
"""

from maskformer_fast.lsa import (
    ArrayLike,
    BatchAssignment,
    Status,
    batch_linear_sum_assignment,
    compiled_backends,
    index_pairs,
    linear_sum_assignment,
)
from maskformer_fast.matcher import HFHungarianMatcher, HFMaskFormerHungarianMatcher, HungarianMatcher

__all__ = [
    "ArrayLike", "BatchAssignment", "HFHungarianMatcher", "HFMaskFormerHungarianMatcher",
    "HungarianMatcher", "Status", "batch_linear_sum_assignment", "compiled_backends",
    "index_pairs", "linear_sum_assignment",
]  # fmt: skip
