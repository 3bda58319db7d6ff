"""Tests of :mod:`dyconv_teach.reference`: the blog's forward is right for B = 1 and
fails for B > 1 with torch's own error; the naive 5-D weight fails too."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from dyconv_teach.reference import blog_dynamic_conv2d, kernel_sum_conv, naive_conv2d, per_sample_conv


def make_tensors(B: int, groups: int, has_bias: bool, seed: int = 0) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """``x [B, 4, 7, 7]``, ``weight [3, 6, 4/groups, 3, 3]``, softmax ``attention [B, 3]``, ``bias [3, 6]``."""
    gen = torch.Generator().manual_seed(seed)
    kw: dict[str, Any] = {"generator": gen, "dtype": torch.float64}
    x = torch.randn(B, 4, 7, 7, **kw)
    weight = torch.randn(3, 6, 4 // groups, 3, 3, **kw)
    attention = torch.softmax(torch.randn(B, 3, **kw), dim=1)
    bias = torch.randn(3, 6, **kw) if has_bias else None
    return x, weight, attention, bias


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("has_bias", [True, False])
def test_the_two_references_agree(groups: int, has_bias: bool) -> None:
    """Mixing kernels then convolving equals convolving then mixing (linearity)."""
    x, weight, attention, bias = make_tensors(3, groups, has_bias)
    conv = {"stride": 2, "padding": 1, "groups": groups}
    torch.testing.assert_close(
        per_sample_conv(x, weight, attention, bias, **conv), kernel_sum_conv(x, weight, attention, bias, **conv)
    )


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("has_bias", [True, False])
def test_blog_is_right_for_a_batch_of_one(groups: int, has_bias: bool) -> None:
    x, weight, attention, bias = make_tensors(1, groups, has_bias)
    out = blog_dynamic_conv2d(x, weight, attention, bias, padding=1, groups=groups)
    torch.testing.assert_close(out, per_sample_conv(x, weight, attention, bias, padding=1, groups=groups))


@pytest.mark.parametrize("B", [2, 3])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("has_bias", [True, False])
def test_blog_fails_for_a_larger_batch_with_torchs_error(B: int, groups: int, has_bias: bool) -> None:
    x, weight, attention, bias = make_tensors(B, groups, has_bias)
    # torch's own message from F.conv2d, not one of ours (ours are ValueError/TypeError).
    with pytest.raises(RuntimeError, match=r"^Given groups=\d+, "):
        blog_dynamic_conv2d(x, weight, attention, bias, padding=1, groups=groups)


@pytest.mark.parametrize("groups", [1, 2])
def test_blog_with_the_corrected_view_is_right_for_any_batch(groups: int) -> None:
    """The blog's lines with ``.view(out_planes, -1, k, k)`` replaced by ``.view(-1, in_planes // groups, k, k)``."""
    x, weight, attention, bias = make_tensors(3, groups, True)
    K, out_planes, kernel_size = weight.shape[0], weight.shape[1], weight.shape[-1]
    batch_size, in_planes, height, width = x.size()
    aggregate_weight = torch.mm(attention, weight.view(K, -1)).view(-1, in_planes // groups, kernel_size, kernel_size)
    aggregate_bias = torch.mm(attention, bias).view(-1)
    folded = x.view(1, -1, height, width)
    output = F.conv2d(folded, aggregate_weight, aggregate_bias, padding=1, groups=groups * batch_size)
    output = output.view(batch_size, out_planes, output.size(-2), output.size(-1))
    torch.testing.assert_close(output, per_sample_conv(x, weight, attention, bias, padding=1, groups=groups))


@pytest.mark.parametrize("B", [1, 2])
def test_naive_five_dimensional_weight_fails_with_torchs_error(B: int) -> None:
    x, weight, attention, bias = make_tensors(B, 1, True)
    with pytest.raises(RuntimeError):
        naive_conv2d(x, weight, attention, bias, padding=1)
