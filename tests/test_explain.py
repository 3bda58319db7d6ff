"""dyconv_teach.teaching.explain: a sentence exactly when torch raises, naming the right axis and numbers."""

from __future__ import annotations

import itertools
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

from dyconv_teach.teaching.explain import BLOG_VIEW, NAIVE_5D, Symbols, conv2d_problem, groups_problem

GENERIC = Symbols(("N", "C_in", "H", "W"), ("C_out", "C_in/groups", "kH", "kW"), "groups")


def torch_error(input: Tuple[int, ...], weight: Tuple[int, ...], groups: int, padding: int = 0,
                dilation: int = 1) -> Optional[str]:
    try:
        F.conv2d(torch.zeros(input), torch.zeros(weight), groups=groups, padding=padding, dilation=dilation)
    except RuntimeError as exc:
        return str(exc)
    return None


def test_sentence_exactly_when_conv2d_raises() -> None:
    # Every kind of mismatch: too few or indivisible kernels, wrong channels, a 5-D weight.
    cases = 0
    for n_in, n_out, w_in, groups in itertools.product((1, 2, 3, 4, 6, 8, 12), (1, 2, 3, 4, 6), (1, 2, 4, 6),
                                                       (1, 2, 3, 4, 6)):
        for weight in ((n_out, w_in, 3, 3), (2, n_out, w_in, 3, 3)):
            error = torch_error((1, n_in, 5, 5), weight, groups)
            problem = conv2d_problem((1, n_in, 5, 5), weight, groups, GENERIC)
            assert (error is None) == (problem is None), (n_in, weight, groups, error, problem)
            cases += error is not None
    assert cases > 500


def test_sentence_exactly_when_the_kernel_does_not_fit() -> None:
    for size, k, padding, dilation in itertools.product(range(1, 12), range(1, 8), range(0, 4), range(1, 4)):
        error = torch_error((1, 1, size, size), (1, 1, k, k), 1, padding, dilation)
        problem = conv2d_problem((1, 1, size, size), (1, 1, k, k), 1, GENERIC, padding, dilation)
        assert (error is None) == (problem is None), (size, k, padding, dilation)
        if problem is not None:
            span = dilation * (k - 1) + 1
            assert f"= {span} pixels" in problem and f"= {size + 2 * padding}," in problem


@pytest.mark.parametrize("B, C, O, g, torch_words, sentence", [
    # B=3: groups = g*B = 3 does not divide the O = 4 kernels of the blog's [O, B*C/g, k, k].
    (3, 4, 4, 1, "expected weight to be divisible by 3 at dimension 0",
     "groups = g*B = 3 must split the O = 4 filters on axis 0 of the weight [O, B*C/g, k, k] = [4, 12, 3, 3] "
     "into equal groups, and 3 does not divide 4."),
    # B=3, g=2: six groups, but only O = 4 kernels.
    (3, 4, 4, 2, "expected weight to be at least 6 at dimension 0",
     "groups = g*B = 6 asks for 6 groups of filters along axis 0 of the weight [O, B*C/g, k, k] = [4, 6, 3, 3], "
     "which holds only O = 4 filters."),
    # B=2 of the running example: the weight's axis 1 is B*C/g, so torch expects B times too many channels.
    (2, 4, 6, 1, "expected input[1, 8, 9, 9] to have 16 channels",
     "Each of the groups = g*B = 2 groups reads B*C/g = 8 channels (axis 1 of the weight [O, B*C/g, k, k] = "
     "[6, 8, 3, 3]), so torch expects 8 * 2 = 16 input channels, but axis 1 of the input [1, B*C, H, W] = "
     "[1, 8, 9, 9] holds B*C = 8."),
])
def test_blog_view_sentences(B: int, C: int, O: int, g: int, torch_words: str, sentence: str) -> None:
    x, weight = (1, B * C, 9, 9), (O, B * C // g, 3, 3)
    error = torch_error(x, weight, g * B)
    assert error is not None and torch_words in error
    assert conv2d_problem(x, weight, g * B, BLOG_VIEW) == sentence


def test_five_d_weight_sentence() -> None:
    error = torch_error((2, 4, 9, 9), (2, 6, 4, 3, 3), 1)
    assert error is not None and "expected stride to be a single integer value or a list of 3 values" in error
    assert conv2d_problem((2, 4, 9, 9), (2, 6, 4, 3, 3), 1, NAIVE_5D) == (
        "The weight [B, O, C/g, k, k] = [2, 6, 4, 3, 3] has 5 axes, so torch reads the call as a 3-D convolution "
        "and asks for 3 strides; F.conv2d takes a 4-D weight, a single kernel for the whole batch, with no "
        "axis for B = 2."
    )


def test_groups_sentence_exactly_when_the_conv2d_module_raises() -> None:
    for C, O, g in itertools.product(range(1, 17), range(1, 17), range(1, 9)):
        try:
            torch.nn.Conv2d(C, O, 3, groups=g)
        except ValueError:
            problem = groups_problem(C, O, g)
            assert problem is not None and f"g = {g} groups" in problem
            assert (f"C/g = {C}/{g}" in problem) == (C % g != 0) and (f"O/g = {O}/{g}" in problem) == (O % g != 0)
        else:
            assert groups_problem(C, O, g) is None, (C, O, g)
