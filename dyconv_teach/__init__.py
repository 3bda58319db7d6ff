"""dyconv_teach: dynamic convolution for PyTorch, and the helpers of the book that teaches it.

The layer (what ``pip install .`` needs, torch alone):

- :class:`~dyconv_teach.layers.DynamicConv1d`, :class:`~dyconv_teach.layers.DynamicConv2d`,
  :class:`~dyconv_teach.layers.DynamicConv3d`: the layers (:mod:`dyconv_teach.layers`), with
  :func:`~dyconv_teach.layers.set_temperature` and :func:`~dyconv_teach.layers.linear_temperature`.
- :class:`~dyconv_teach.odconv.ODConv2d` (:mod:`dyconv_teach.odconv`): omni-dimensional dynamic
  convolution, which loads the official checkpoints.
- :mod:`dyconv_teach.functional`: the exact batched core, ``dynamic_conv1d/2d/3d``.
- :mod:`dyconv_teach.strategies`: the ways to batch it and the rule that picks one.
- :mod:`dyconv_teach.reference`: slow reference versions and a blog post's buggy one.
- :mod:`dyconv_teach.bench`: the benchmark, ``python -m dyconv_teach.bench``.
- :mod:`dyconv_teach.kernels.triton_conv`: fused GPU kernels (the ``gpu`` extra, Triton).

The book's helpers live in :mod:`dyconv_teach.teaching` (the ``book`` extra: ipywidgets,
matplotlib); nothing above imports them.
"""

from .functional import dynamic_conv1d, dynamic_conv2d, dynamic_conv3d
from .layers import DynamicConv1d, DynamicConv2d, DynamicConv3d, linear_temperature, set_temperature
from .odconv import ODConv2d

__all__ = [
    "DynamicConv1d",
    "DynamicConv2d",
    "DynamicConv3d",
    "ODConv2d",
    "dynamic_conv1d",
    "dynamic_conv2d",
    "dynamic_conv3d",
    "linear_temperature",
    "set_temperature",
]
__version__ = "0.2.0"
