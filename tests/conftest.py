"""Shared pytest setup for the unit tests."""

import os

import torch

# Without CUDA, the fused Triton kernels (tests/test_triton_conv.py) run on CPU tensors under
# Triton's interpreter, which must be switched on before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The unit tests use tensors of a few hundred elements: a thread pool gains nothing on
# them, and on a busy machine its spinning threads make the suite many times slower.
torch.set_num_threads(1)
