"""dyconv_teach: dynamic convolution for PyTorch, and the helpers of the book that teaches it.

- :mod:`dyconv_teach.functional`: the exact batched core, :func:`dynamic_conv2d`.
- :mod:`dyconv_teach.layers`: :class:`DynamicConv2d`, the layer.
- :mod:`dyconv_teach.reference`: slow reference versions and a blog post's buggy one.

Teaching helpers (shape tables, widgets, plots) live in their own modules and
are not imported here, so using the layer never pulls in ipywidgets or matplotlib.
"""

from .functional import dynamic_conv2d
from .layers import DynamicConv2d, linear_temperature, set_temperature

__all__ = ["DynamicConv2d", "dynamic_conv2d", "linear_temperature", "set_temperature"]
__version__ = "0.1.0"
