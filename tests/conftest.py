import os

import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU. The
# variable must be set before any @triton.jit decorator runs, so before the kernel
# modules are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
