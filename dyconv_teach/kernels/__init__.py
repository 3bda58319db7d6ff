"""Fused kernels for the core: the ``fused`` strategy of :mod:`dyconv_teach.strategies`.

- :mod:`~dyconv_teach.kernels.cpu_conv`: on a CPU, C kernels (``cpu_conv.c``) compiled at first
  use, for the forward and backward of 2-D dynamic convolution as GEMMs over im2col rows that
  mix each sample's kernel one cache-sized tile at a time.
- :mod:`~dyconv_teach.kernels.triton_conv` (the ``gpu`` extra: Triton): on CUDA, implicit GEMMs
  that mix each sample's kernel tile in registers where it is consumed; imported on first use.
"""

__all__: list = []
