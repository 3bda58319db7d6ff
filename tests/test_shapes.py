"""dyconv_teach.teaching.shapes against real torch calls."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from dyconv_teach.reference import blog_dynamic_conv2d, per_sample_conv
from dyconv_teach.teaching.shapes import (
    EXAMPLE,
    batch_kernel_shapes,
    conv2d_output_size,
    grouped_conv_shapes,
    output_size_formula,
    record_conv_calls,
    shape_text,
    static_conv_shapes,
)


def torch_error(fn, *args, **kwargs) -> str:
    """The message of the RuntimeError that ``fn`` raises."""
    with pytest.raises(RuntimeError) as info:
        fn(*args, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("size", [1, 2, 5, 8, 13])
def test_output_size_matches_conv2d(size: int) -> None:
    x = torch.zeros(1, 1, size, size)
    for k, stride, padding, dilation in itertools.product((1, 2, 3, 5), (1, 2, 3), (0, 1, 2), (1, 2, 3)):
        try:
            expected = F.conv2d(x, torch.zeros(1, 1, k, k), stride=stride, padding=padding, dilation=dilation).shape[-1]
        except RuntimeError:
            with pytest.raises(ValueError, match="< 1"):
                conv2d_output_size(size, k, stride, padding, dilation)
            assert output_size_formula(size, k, stride, padding, dilation).endswith("(< 1: no valid output)")
            continue
        assert conv2d_output_size(size, k, stride, padding, dilation) == expected
        assert output_size_formula(size, k, stride, padding, dilation).endswith(f"= {expected}")


def test_output_size_formula_fills_in_the_numbers() -> None:
    assert output_size_formula(28, 5, 2, 1, 2) == "H' = floor((28 + 2*1 - 2*(5 - 1) - 1) / 2 + 1) = 11"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"size": 3, "kernel_size": 5}, "dilated kernel spans dilation\\*\\(kernel_size-1\\)\\+1 = 5 pixels"),
        ({"size": 8, "kernel_size": 3, "stride": 0}, "stride must be >= 1, got 0"),
        ({"size": 8, "kernel_size": 3, "padding": -1}, "padding must be >= 0, got -1"),
    ],
)
def test_output_size_errors_name_the_bad_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        conv2d_output_size(**kwargs)


def test_record_conv_calls_records_failed_calls_too() -> None:
    with record_conv_calls() as rec:
        F.conv2d(torch.zeros(2, 4, 6, 6), torch.zeros(6, 2, 3, 3), groups=2)
        with pytest.raises(RuntimeError):
            F.conv2d(torch.zeros(1, 4, 6, 6), torch.zeros(6, 3, 3, 3))
    assert [(c.input, c.weight, c.groups, c.output) for c in rec.calls] == [
        ((2, 4, 6, 6), (6, 2, 3, 3), 2, (2, 6, 4, 4)),
        ((1, 4, 6, 6), (6, 3, 3, 3), 1, None),
    ]


@pytest.mark.parametrize(
    "C, O, k, stride, padding, dilation, H", [(3, 16, 3, 1, 1, 1, 8), (1, 4, 5, 2, 0, 2, 28), (8, 4, 7, 1, 0, 2, 5)]
)
def test_static_conv_shapes(C: int, O: int, k: int, stride: int, padding: int, dilation: int, H: int) -> None:
    r = static_conv_shapes(C, O, k, stride, padding, dilation, H)
    x, w = torch.zeros(1, C, H, H), torch.zeros(O, C, k, k)
    assert (r.input, r.weight) == ((1, C, H, H), (O, C, k, k))
    assert r.formula == output_size_formula(H, k, stride, padding, dilation)
    try:
        expected = tuple(F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation).shape)
    except RuntimeError as exc:
        assert (r.output, r.error) == (None, str(exc))
    else:
        assert (r.output, r.error) == (expected, None)
    assert (r.error is None) == (dilation * (k - 1) + 1 <= H + 2 * padding)


@pytest.mark.parametrize("C, O, g", list(itertools.product((1, 2, 4, 6), (2, 3, 4, 6), (1, 2, 3, 4, 8))))
def test_grouped_conv_shapes(C: int, O: int, g: int) -> None:
    r = grouped_conv_shapes(C, O, g)
    if C % g or O % g:
        with pytest.raises(ValueError) as info:
            torch.nn.Conv2d(C, O, 3, groups=g)
        assert (r.error, r.weight, r.output, r.split) == (str(info.value), None, None, ())
        return
    k, H = EXAMPLE.k, EXAMPLE.H
    assert r.weight == (O, C // g, k, k)
    assert (r.error, r.output) == (None, (1, O, H - k + 1, H - k + 1))
    assert (r.params, r.params_dense) == (O * (C // g) * k * k, O * C * k * k)
    assert [list(i) for i, _ in r.split] == [list(range(j * C // g, (j + 1) * C // g)) for j in range(g)]
    assert sorted(m for _, o in r.split for m in o) == list(range(O))


@pytest.mark.parametrize("B, K, g", list(itertools.product((1, 2, 3), (1, 3), (1, 2))))
def test_batch_kernel_shapes(B: int, K: int, g: int) -> None:
    C, O, k, H = 4, 6, 3, 7
    r = batch_kernel_shapes(B, K, C, O, g, k, H)
    assert (r.x, r.attention, r.bank) == ((B, C, H, H), (B, K), (K, O, C // g, k, k))
    # K lives in the mixing product only: [B, K] @ [K, O*C/g*k*k] -> [B, O*C/g*k*k].
    assert (r.flat_bank, r.mixed) == ((K, O * C // g * k * k), (B, O * C // g * k * k))
    assert r.aggregated == (B, O, C // g, k, k)
    # The naive error is torch's own message for a 5-D weight.
    assert r.naive_error == torch_error(F.conv2d, torch.zeros(B, C, H, H), torch.zeros(B, O, C // g, k, k), groups=g)
    # The blog's view puts the B kernels on the input-channel axis: fine only for B = 1.
    x, bank, pi = torch.randn(B, C, H, H), torch.randn(K, O, C // g, k, k), torch.softmax(torch.randn(B, K), 1)
    assert (r.blog_call.weight, r.blog_call.groups) == ((O, B * C // g, k, k), g * B)
    if B == 1:
        assert (r.blog_error, r.blog_output) == (None, (1, O, H - 2, H - 2))
    else:
        assert r.blog_output is None
        assert r.blog_error == torch_error(blog_dynamic_conv2d, x, bank, pi, groups=g)
    # The trick: one grouped call on the folded batch, equal to the per-sample loop.
    assert (r.trick_call.input, r.trick_call.weight) == ((1, B * C, H, H), (B * O, C // g, k, k))
    assert r.trick_call.groups == B * g
    assert r.trick_call.output == (1, B * O, H - 2, H - 2)
    assert r.trick_output == tuple(per_sample_conv(x, bank, pi, groups=g).shape) == (B, O, H - 2, H - 2)
    assert r.matches_loop is True


def test_running_example_has_no_two_equal_sizes() -> None:
    # H' = H - k + 1, the output size of the explorers' unpadded convolution.
    sizes = [*EXAMPLE, EXAMPLE.H - EXAMPLE.k + 1]
    assert len(set(sizes)) == len(sizes), EXAMPLE
    r = batch_kernel_shapes()
    assert r.x == (EXAMPLE.B, EXAMPLE.C, EXAMPLE.H, EXAMPLE.H) and r.bank[:2] == (EXAMPLE.K, EXAMPLE.O)


def test_shape_text() -> None:
    assert (shape_text((2, 6, 4, 3, 3)), shape_text(())) == ("[2, 6, 4, 3, 3]", "[]")
    assert shape_text(None) == "-"
