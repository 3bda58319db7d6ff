"""Fused GPU kernels for the core (the ``gpu`` extra: Triton).

- :mod:`~dyconv_teach.kernels.triton_conv`: the forward and backward of 2-D dynamic
  convolution as implicit GEMMs that mix each sample's kernel tile where it is consumed.
  The ``fused`` strategy (:mod:`dyconv_teach.strategies`) imports it on first use.
"""

__all__: list = []
