"""Shared pytest setup for the unit tests."""

import torch

# The unit tests use tensors of a few hundred elements: a thread pool gains nothing on
# them, and on a busy machine its spinning threads make the suite many times slower.
torch.set_num_threads(1)
