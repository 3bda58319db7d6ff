"""Check a dynamic convolution you wrote yourself, and name the mistake when it is wrong.

- :func:`check_dynamic_conv` checks a function with the signature of the functional core,
  ``fn(x, bank, attention, bias=None, stride=1, padding=0, dilation=1, groups=1)`` returning
  ``[B, O, H', W']``, against the per-sample loop :func:`~dyconv_teach.reference.per_sample_conv`.
- :func:`check_attention` checks the attention branch, ``fn(x, fc1, fc2, temperature)`` returning
  ``pi`` ``[B, K]``, against :meth:`~dyconv_teach.layers.DynamicConv2d.attention`. The core takes
  ``pi`` as an argument, so the mistakes made in computing it (a softmax over the batch axis, a
  missing temperature) cannot happen there and have a checker of their own.

Each checker runs the function on a few small cases (:data:`CONV_CASES`, :data:`ATTENTION_CASES`),
each built so that one known mistake shows in it (``B = 1`` against ``B > 1``, ``B = K``, a
non-square input, ``g > 1``, a ``channels_last`` input, a bias, ...), and compares the output
and its gradients with the reference's, in float64, on inputs seeded by the case. It prints the
first case that fails in plain words (its sizes, what was expected, what came back) and returns a
:class:`CheckResult`.

It then names the mistake if a known wrong implementation (:data:`CONV_MISTAKES`,
:data:`ATTENTION_MISTAKES`) behaves as the function does: the same wrong tensor or the same error
message in the failing case, or, where both raise with other messages there (code written another
way words its error otherwise), the same behaviour on every case and the same wrong result in at
least one. Of several, it names the one that differs from the function on the fewest cases, so
that a second, independent mistake does not hide the first. Each :class:`Mistake` says where the
book explains it.

Needs torch alone, not the ``book`` extra, so that it also runs in a plain Python session::

    python -c "from dyconv_teach.teaching.checker import check_dynamic_conv; \\
    from dyconv_teach import dynamic_conv2d; check_dynamic_conv(dynamic_conv2d)"
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import textwrap
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layers import DynamicConv2d
from ..reference import blog_dynamic_conv2d, naive_conv2d, per_sample_conv

__all__ = [
    "Case", "Mistake", "CheckResult", "check_dynamic_conv", "check_attention", "CONV_CASES", "ATTENTION_CASES",
    "CONV_MISTAKES", "ATTENTION_MISTAKES", "CUT_FROM_GRAPH",
]

_TORCH_DIR = os.path.dirname(torch.__file__)
#: The chapters a mistake can point to, by number: their titles.
_CHAPTERS = {4: "Dynamic convolution", 5: "The batch as groups", 6: "Checking a dynamic convolution"}


@dataclass(frozen=True)
class Case:
    """One input a checker runs the function on: what it covers, and its sizes in the book's
    notation (the input ``[B, C, H, W]``, ``K`` kernels ``[O, C/g, k, k]``)."""

    #: What the case covers, in a few words (``"a non-square input (9 x 7)"``).
    name: str
    B: int
    C: int = 4
    O: int = 6
    K: int = 5
    k: int = 3
    H: int = 9
    W: int = 9
    g: int = 1
    #: Whether the bias bank ``[K, O]`` is given (else ``None``).
    bias: bool = False
    #: Whether ``x`` is in ``torch.channels_last`` memory format.
    channels_last: bool = False
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    #: The attention's temperature tau (:func:`check_attention` only).
    temperature: float = 1.0


@dataclass(frozen=True)
class Mistake:
    """A known mistake: the section of the book that explains it, and wrong implementations that
    make it, with the checked function's signature (none for :data:`CUT_FROM_GRAPH`, which is
    recognised by its symptom)."""

    #: A short identifier, such as ``"blog_view"``.
    name: str
    #: The mistake in a few words, as the report names it.
    what: str
    #: What it does wrong, and the fix.
    why: str
    #: The number of the chapter that explains it.
    chapter: int
    #: The title of that section, as the chapter writes it.
    section: str
    #: Wrong implementations with the checked function's signature.
    implementations: Tuple[Callable[..., Any], ...] = field(default=(), repr=False, compare=False)

    def where(self) -> str:
        """``'chapter 5 (The batch as groups), section "With g > 1"'``."""
        return _where(self.chapter, self.section)


def _where(chapter: int, section: str) -> str:
    return f'chapter {chapter} ({_CHAPTERS[chapter]}), section "{section.replace("$", "")}"'


@dataclass(frozen=True)
class CheckResult:
    """What a checker found; true if the function passed every case."""

    #: Whether every case passed.
    passed: bool
    #: The checker's cases, in the order they run.
    cases: Tuple[Case, ...]
    #: The first case that failed, ``None`` if all passed.
    failed: Optional[Case]
    #: What came back in that case, in words (``""`` if all passed).
    problem: str
    #: The mistake recognised, if any.
    mistake: Optional[Mistake]
    #: The text the checker printed.
    report: str

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        if self.passed:
            return f"CheckResult(passed=True, cases={len(self.cases)})"
        mistake = None if self.mistake is None else self.mistake.name
        return f"CheckResult(passed=False, failed={self.failed.name if self.failed else None!r}, mistake={mistake!r})"


# -- the cases -----------------------------------------------------------------------------------

#: The cases of :func:`check_dynamic_conv`, the book's running example (``B = 2, C = 4, O = 6, K = 5,
#: k = 3``, 9 x 9) varied one thing at a time, then all at once. ``C != O`` and ``B != K`` throughout,
#: except in the case ``B = K``, and ``B != g`` where ``g > 1``; without a bias except where the case says.
#:
#: :meta hide-value:
CONV_CASES: Tuple[Case, ...] = (
    Case("one sample (B = 1)", B=1),
    Case("two samples (B = 2, K = 5)", B=2),
    Case("as many samples as kernels (B = K = 5)", B=5),
    Case("a non-square input (9 x 7)", B=2, W=7),
    Case("a bias", B=2, bias=True),
    Case("groups (g = 2)", B=3, g=2),
    Case("a channels_last input", B=2, channels_last=True),
    Case("stride 2, padding 1, dilation 2", B=2, stride=2, padding=1, dilation=2),
    Case("all of them at once", B=3, K=2, W=7, g=2, bias=True, channels_last=True, stride=2, padding=1, dilation=2),
)

#: The cases of :func:`check_attention`, the running example's sizes varied one thing at a time.
#:
#: :meta hide-value:
ATTENTION_CASES: Tuple[Case, ...] = (
    Case("one sample (B = 1)", B=1),
    Case("two samples (B = 2, K = 5)", B=2),
    Case("a non-square input (9 x 7)", B=2, W=7),
    Case("a channels_last input", B=2, channels_last=True),
    Case("the temperature tau = 30", B=2, temperature=30.0),
    Case("all of them at once", B=3, W=7, channels_last=True, temperature=30.0),
)


class _Inputs(NamedTuple):
    args: Tuple[Any, ...]  # what the function is called with
    leaves: Dict[str, Tensor]  # the tensors whose gradients are compared, by name
    reference: Callable[[], Tensor]  # the right output for ``args``


def _random(case: Case, seed: int) -> Tuple[Callable[..., Tensor], Tensor]:
    """A float64 ``randn`` seeded by the case, and the input ``x`` drawn from it (leaf, grad)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    x = randn(case.B, case.C, case.H, case.W)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return randn, x.requires_grad_()


def _conv_inputs(case: Case, seed: int) -> _Inputs:
    randn, x = _random(case, seed)
    leaves = {
        "x": x,
        "bank": randn(case.K, case.O, case.C // case.g, case.k, case.k).requires_grad_(),
        # rows that sum to 1 and differ between samples (a low temperature: chapter 6's advice)
        "attention": torch.softmax(randn(case.B, case.K), dim=1).requires_grad_(),
    }
    if case.bias:
        leaves["bias"] = randn(case.K, case.O).requires_grad_()
    bias = leaves.get("bias")
    conv = (case.stride, case.padding, case.dilation, case.g)
    return _Inputs(
        (x, leaves["bank"], leaves["attention"], bias, *conv),
        leaves,
        lambda: per_sample_conv(x, leaves["bank"], leaves["attention"], bias, stride=case.stride,
                                padding=case.padding, dilation=case.dilation, groups=case.g),
    )


def _attention_inputs(case: Case, seed: int) -> _Inputs:
    randn, x = _random(case, seed)
    # skip_init: the layer's parameters are drawn from the case's generator, not torch's global one
    layer = torch.nn.utils.skip_init(DynamicConv2d, case.C, case.O, case.k, num_kernels=case.K,
                                     temperature=case.temperature, dtype=torch.float64)
    leaves = {"x": x}
    for name, parameter in layer.named_parameters():
        if name.startswith(("fc1.", "fc2.")):
            with torch.no_grad():
                parameter.copy_(randn(*parameter.shape))
            leaves[name] = parameter
    return _Inputs((x, layer.fc1, layer.fc2, layer.temperature), leaves, lambda: layer.attention(x))


# -- the mistakes --------------------------------------------------------------------------------


def _batch_as_groups(
    x: Tensor, bank: Tensor, attention: Tensor, bias: Optional[Tensor] = None, stride: int = 1, padding: int = 0,
    dilation: int = 1, groups: int = 1, *,
    spatial: Callable[[Tensor], Sequence[int]] = lambda x: x.shape[2:],  # H, W
    mix: str = "bj,j...->b...",  # sample b's kernel: sum_j pi[b, j] Theta_j
    mix_bias: Callable[[Tensor, Tensor], Optional[Tensor]] = lambda pi, bias: pi @ bias,  # [B, O]
    fold: Callable[[Tensor, Tuple[int, ...]], Tensor] = torch.reshape,  # [B, C, H, W] -> [1, B*C, H, W]
    batch_groups: Callable[[int, int], int] = lambda B, g: B * g,
    unfold: Callable[[Tensor, int, int], Tensor] = lambda out, B, O: out.reshape(B, O, *out.shape[2:]),
) -> Tensor:
    """The four steps of chapter 5's trick, each an argument (as in chapter 6's gallery), so that
    a mistake is one step replaced; with the defaults it is right."""
    B, C = x.shape[:2]
    H, W = spatial(x)
    O = bank.shape[1]
    weight = torch.einsum(mix, attention, bank).reshape(B * O, *bank.shape[2:])  # [B*O, C/g, k, k]
    mixed_bias = None if bias is None else mix_bias(attention, bias)
    out = F.conv2d(fold(x, (1, B * C, H, W)), weight, None if mixed_bias is None else mixed_bias.reshape(B * O),
                   stride, padding, dilation, batch_groups(B, groups))
    return unfold(out, B, O)


def _slip(**step: Any) -> Callable[..., Tensor]:
    return functools.partial(_batch_as_groups, **step)


def _naive(x: Tensor, bank: Tensor, attention: Tensor, bias: Optional[Tensor], stride: int, padding: int,
           dilation: int, groups: int) -> Tensor:
    return naive_conv2d(x, bank, attention, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)


#: The mistakes :func:`check_dynamic_conv` recognises, in the order it tries them.
#:
#: :meta hide-value:
CONV_MISTAKES: Tuple[Mistake, ...] = (
    Mistake(
        "naive_5d", "the 5-D weight handed to `F.conv2d`",
        "The mixed kernels [B, O, C/g, k, k] have a batch axis, and `F.conv2d` takes one 4-D weight "
        "[O, C/g, k, k] for the whole batch; it reads a 5-D weight as a 3-D convolution's, hence the "
        "message about strides. Convolve each sample with its own 4-D kernel (a loop over the batch), "
        "or, in one call, fold the batch into the channels, `x.reshape(1, B*C, H, W)`, stack the "
        "kernels along the output axis, [B*O, C/g, k, k], and convolve with `groups=B*g` (chapter 5).",
        4, "The 5-D kernel does not fit `F.conv2d`", (_naive,),
    ),
    Mistake(
        "blog_view", "the blog post's `.view(out_planes, -1, k, k)`",
        "It fixes the first axis of the mixed kernels to O and lets the second absorb the batch: "
        "[O, B*C/g, k, k] puts the B kernels on the input-channel axis, where the grouped convolution "
        "needs them on the output-channel axis, [B*O, C/g, k, k]. With B = 1 the two are the same, which "
        "is why one sample works. Fix the last axes instead: `.reshape(-1, C // g, k, k)`.",
        5, "The blog's code: `.view(out_planes, -1, k, k)`", (blog_dynamic_conv2d,),
    ),
    Mistake(
        "groups_without_batch", "`groups=g` instead of `groups=B*g`",
        "After the fold the input is one sample of B*C channels, and the weight holds the kernels of all B "
        "samples, B*O filters. Only `groups=B*g` gives each sample's channels to its own kernel; with "
        "`groups=g` torch expects the C channels of one sample, and finds B*C.",
        5, "Step 3: one grouped convolution, `groups = B*g`", (_slip(batch_groups=lambda B, g: g),),
    ),
    Mistake(
        "groups_batch_only", "`groups=B` instead of `groups=B*g`",
        "With groups in the layer itself, each sample's channels are split into g groups of their own, so "
        "the grouped convolution needs `groups=B*g` in all; `groups=B` is right only for g = 1.",
        5, "With $g > 1$", (_slip(batch_groups=lambda B, g: B),),
    ),
    Mistake(
        "not_reshaped_back", "the output not reshaped back to [B, O, H', W']",
        "The grouped convolution returns one sample of B*O channels, [1, B*O, H', W']; with B = 1 that is "
        "already the right shape. Reshape it back: `out.reshape(B, O, *out.shape[2:])`.",
        5, "Step 4: back to $[B, O, H', W']$", (_slip(unfold=lambda out, B, O: out),),
    ),
    Mistake(
        "view_not_reshape", "`.view` where `.reshape` is needed",
        "Folding [B, C, H, W] into [1, B*C, H, W] merges the B and C axes, which a channels_last tensor "
        "does not store next to each other: `view` refuses, `reshape` copies. Use "
        "`x.reshape(1, B*C, H, W)`.",
        6, "2. `view` where `reshape` is needed", (_slip(fold=torch.Tensor.view),),
    ),
    Mistake(
        "height_width_swapped", "height and width swapped",
        "Square inputs hide it; on an input with H != W the output comes back [B, O, W', H'], or with its "
        "pixels shuffled. Unpack the sizes in the order the tensor stores them: `B, C, H, W = x.shape`.",
        6, "1. Axis swaps hidden by equal lengths",
        (_slip(spatial=lambda x: x.shape[:1:-1]), _slip(unfold=lambda out, B, O: out.reshape(B, O, *out.shape[:1:-1]))),
    ),
    Mistake(
        "attention_axes_swapped", "the batch and kernel axes of the attention swapped",
        "The attention is [B, K]. Mixed as if it were [K, B], it raises when B != K, and when B = K it "
        "runs and builds sample b's kernel from the wrong weights. Sum over the kernel axis: "
        "`attention @ bank.reshape(K, -1)`, or `torch.einsum('bj,j...->b...', attention, bank)`.",
        6, "1. Axis swaps hidden by equal lengths", (_slip(mix="jb,j...->b..."),),
    ),
    Mistake(
        "bias_averaged", "one bias for every sample, the average of the K",
        "Each kernel has its own bias, and sample b's bias is sum_j pi[b, j] bias_j, mixed like its kernel: "
        "`attention @ bias`, [B, O]. The average of the K is nearly right only while the attention is "
        "nearly uniform (at a high temperature).",
        6, "3. Forgetting the bias mix", (_slip(mix_bias=lambda pi, bias: bias.mean(dim=0).expand(len(pi), -1)),),
    ),
    Mistake(
        "bias_transposed", "the mixed bias flattened transposed",
        "`attention @ bias` is [B, O], one sample after the other; flattened as [O, B], sample 0's "
        "channels get the biases of several samples. Flatten it as it is: `(attention @ bias).reshape(B*O)`.",
        6, "3. Forgetting the bias mix", (_slip(mix_bias=lambda pi, bias: (pi @ bias).T),),
    ),
    Mistake(
        "bias_left_out", "the bias left out",
        "The output has no bias. Mix the bias bank like the kernels, `attention @ bias`, [B, O], and hand "
        "it to `F.conv2d` as `.reshape(B*O)`.",
        6, "3. Forgetting the bias mix", (_slip(mix_bias=lambda pi, bias: None),),
    ),
)


def _logits(x: Tensor, fc1: Callable[[Tensor], Tensor], fc2: Callable[[Tensor], Tensor]) -> Tensor:
    return fc2(F.relu(fc1(x.mean(dim=(2, 3)))))


#: The mistakes :func:`check_attention` recognises, in the order it tries them.
#:
#: :meta hide-value:
ATTENTION_MISTAKES: Tuple[Mistake, ...] = (
    Mistake(
        "softmax_over_batch", "the softmax over the batch axis",
        "The logits are [B, K]; `softmax(dim=0)` normalises each kernel's weights over the batch, so a "
        "sample's attention depends on the other samples and its row does not sum to 1 (with B = 1 every "
        "weight is 1). Normalise each sample's K weights: `dim=1`, or `dim=-1`.",
        6, "4. Softmax over the batch axis",
        (lambda x, fc1, fc2, tau: torch.softmax(_logits(x, fc1, fc2) / tau, dim=0),),
    ),
    Mistake(
        "no_temperature", "the temperature left out",
        "It is right at tau = 1 only. Divide the logits by tau before the softmax, "
        "`softmax(logits / tau, dim=1)`: a large tau (30 when training starts) makes the attention nearly "
        "uniform.",
        5, "The attention module: 1 × 1 convolutions, hidden width $K$, no temperature",
        (lambda x, fc1, fc2, tau: torch.softmax(_logits(x, fc1, fc2), dim=1),),
    ),
    Mistake(
        "temperature_multiplied", "the logits multiplied by the temperature",
        "It is right at tau = 1 only: multiplying by tau sharpens the attention where dividing flattens "
        "it. Use `softmax(logits / tau, dim=1)`.",
        4, "What the temperature does",
        (lambda x, fc1, fc2, tau: torch.softmax(_logits(x, fc1, fc2) * tau, dim=1),),
    ),
    Mistake(
        "no_relu", "the ReLU between `fc1` and `fc2` left out",
        "Without it the two linear layers are one linear map. The branch is `fc2(relu(fc1(pooled)))`, "
        "with `pooled = x.mean(dim=(2, 3))`.",
        4, "The attention branch, step by step",
        (lambda x, fc1, fc2, tau: torch.softmax(fc2(fc1(x.mean(dim=(2, 3)))) / tau, dim=1),),
    ),
)

#: The mistake both checkers recognise by its symptom, a right output with a wrong gradient.
#:
#: :meta hide-value:
CUT_FROM_GRAPH = Mistake(
    "cut_from_graph", "part of the computation cut from autograd's graph",
    "The output is right, so the forward pass is; a gradient that is missing or differs means autograd "
    "does not see part of the computation: a `.detach()`, `.data`, `.item()`, `.numpy()` or "
    "`torch.no_grad()` on the way from that input to the output.",
    6, "Gradients",
)


# -- running a function --------------------------------------------------------------------------


def _conv_sizes(case: Case) -> str:
    extra = [] if (case.stride, case.padding, case.dilation) == (1, 0, 1) else [
        f"stride {case.stride}, padding {case.padding}, dilation {case.dilation}"]
    return ", ".join([f"B = {case.B}, C = {case.C}, O = {case.O}, K = {case.K}, k = {case.k}, g = {case.g}",
                      f"input {case.H} x {case.W}", "a bias" if case.bias else "no bias", *extra,
                      *["channels_last"] * case.channels_last])


def _attention_sizes(case: Case) -> str:
    return ", ".join([f"B = {case.B}, C = {case.C}, K = {case.K}", f"input {case.H} x {case.W}",
                      f"tau = {case.temperature:g}", *["channels_last"] * case.channels_last])


class _Checker(NamedTuple):
    cases: Tuple[Case, ...]
    inputs: Callable[[Case, int], _Inputs]
    mistakes: Tuple[Mistake, ...]
    sizes: Callable[[Case], str]  # a case's sizes, in words
    output: str  # the output's shape in symbols
    reference: str  # what computes the right output
    gradients: str  # with respect to what the gradients are compared
    guide: Tuple[int, str]  # where the book builds it, for a failure no known mistake explains


_CONV = _Checker(
    CONV_CASES, _conv_inputs, CONV_MISTAKES, _conv_sizes, output="[B, O, H', W']",
    reference="the per-sample loop (reference.per_sample_conv)", gradients="x, bank, attention and bias",
    guide=(5, "The trick in four steps"),
)
_ATTENTION = _Checker(
    ATTENTION_CASES, _attention_inputs, ATTENTION_MISTAKES, _attention_sizes, output="[B, K]",
    reference="DynamicConv2d.attention", gradients="x and the weights and biases of fc1 and fc2",
    guide=(4, "The attention branch, step by step"),
)

#: What a function did on a case: its output, or the error it raised (as text).
_Outcome = Union[Tensor, str, None]


class _Failure(NamedTuple):
    problem: str  # what came back, in words
    forward: bool  # whether the output itself was wrong (else a gradient)
    mistake: Optional[Mistake] = None  # a mistake recognised by its symptom


def _close(a: Tensor, b: Tensor) -> bool:
    """Equal to float64 rounding (different exact algorithms differ by about 1e-15)."""
    return torch.allclose(a, b, rtol=1e-7, atol=1e-9)


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def _raised(error: Exception) -> str:
    """``'RuntimeError at line 7 of my_conv, `out = F.conv2d(...)`: the message'``: where in the
    reader's code (the last frame outside torch and this module) and what."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not f.filename.startswith(_TORCH_DIR) and f.filename != __file__]
    where = ""
    if frames:
        frame = frames[-1]
        where = f" at line {frame.lineno} of {frame.name}"
        if frame.line and getattr(frame, "end_lineno", None) == frame.lineno:  # the whole statement (Python 3.11+)
            where += f", `{frame.line.strip()}`"
    return f"{type(error).__name__}{where}: {error}"


def _outcome(fn: Callable[..., Any], args: Tuple[Any, ...]) -> _Outcome:
    """The output of ``fn(*args)`` without gradients (``None`` if it is not a tensor), or its error
    message; what it prints is dropped (the reader saw it when the case ran)."""
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            out = fn(*args)
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return out if isinstance(out, Tensor) else None


def _compare(a: _Outcome, b: _Outcome) -> str:
    """``'same'`` (equal tensors, or the same error message), ``'alike'`` (both raised, with other
    messages) or ``'different'``."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        equal = a.shape == b.shape and a.dtype == b.dtype and _close(a, b)
        return "same" if equal else "different"
    if isinstance(a, str) and isinstance(b, str):
        return "same" if a == b else "alike"
    return "different"


def _diagnose(checker: _Checker, fn: Callable[..., Any], failed: int) -> Optional[Mistake]:
    """The known mistake that behaves most like ``fn`` (see the module docstring), if any: of those
    that fail the failing case exactly as ``fn`` does, or raise there too and behave as it does on
    every case, the one that differs from ``fn`` on the fewest cases (the first of equals)."""
    inputs = [checker.inputs(case, seed) for seed, case in enumerate(checker.cases)]
    with torch.no_grad():
        right: List[_Outcome] = [i.reference() for i in inputs]
    theirs = [_outcome(fn, checker.inputs(case, seed).args) for seed, case in enumerate(checker.cases)]
    wrong = [_compare(t, r) != "same" for t, r in zip(theirs, right)]
    best: Optional[Tuple[int, Mistake]] = None
    for mistake in checker.mistakes:
        for implementation in mistake.implementations:
            verdicts = [_compare(t, _outcome(implementation, i.args)) for t, i in zip(theirs, inputs)]
            differences = verdicts.count("different")
            alike = verdicts[failed] == "alike" and not differences and any(
                v == "same" and w for v, w in zip(verdicts, wrong)
            )
            if (verdicts[failed] == "same" or alike) and (best is None or differences < best[0]):
                best = (differences, mistake)
    return None if best is None else best[1]


def _output_problem(out: Any, expected: Tensor) -> Optional[str]:
    if out is None:
        return "None: the function returns nothing (a missing return?)"
    if not isinstance(out, Tensor):
        return f"a {type(out).__name__}, not a tensor"
    if out.dtype != expected.dtype:
        return f"a {out.dtype} tensor; with float64 inputs the output must be float64 too"
    if out.shape != expected.shape:
        return f"a tensor of shape {_shape(out.shape)}"
    if _close(out, expected):
        return None
    off = [b for b in range(len(out)) if not _close(out[b], expected[b])]
    right = [b for b in range(len(out)) if b not in off]
    largest = (out - expected).abs().max().item()
    return (
        f"a tensor of the right shape, {_shape(out.shape)}, with other values: the largest difference is "
        f"{largest:.2g}, in sample{'s' * (len(off) > 1)} {', '.join(map(str, off))}"
        + (f" (sample{'s' * (len(right) > 1)} {', '.join(map(str, right))} right)" if right else "")
    )


def _run_case(checker: _Checker, fn: Callable[..., Any], case: Case, seed: int) -> Optional[_Failure]:
    """Run ``fn`` on one case: ``None`` if its output and gradients equal the reference's."""
    reference = checker.inputs(case, seed)
    expected = reference.reference()
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1000 + seed), dtype=expected.dtype)
    wanted = torch.autograd.grad(expected, list(reference.leaves.values()), grad_out)
    inputs = checker.inputs(case, seed)
    try:
        out = fn(*inputs.args)
    except Exception as error:
        return _Failure(_raised(error), forward=True)
    problem = _output_problem(out, expected.detach())
    if problem is not None:
        return _Failure(problem, forward=True)
    leaves = list(inputs.leaves.values())
    try:
        got: Sequence[Optional[Tensor]] = (
            torch.autograd.grad(out, leaves, grad_out, allow_unused=True) if out.requires_grad else [None] * len(leaves)
        )
    except Exception as error:
        return _Failure(f"the right output, but computing its gradients raised {_raised(error)}", forward=False)
    for name, g, w in zip(inputs.leaves, got, wanted):
        if g is None:
            return _Failure(f"the right output, but no gradient reaches {name}", False, CUT_FROM_GRAPH)
        if not _close(g, w):
            largest = (g - w).abs().max().item()
            return _Failure(f"the right output, but the gradient with respect to {name} differs (by up to "
                            f"{largest:.2g})", False, CUT_FROM_GRAPH)
    return None


#: What a line of the report must not break: code, shapes, "B = 2", "9 x 7".
_UNBREAKABLE = re.compile(r"`[^`]*`|\[[^\]]*\]|\S+ = \S+|\d+ x \d+")


def _paragraph(label: str, text: str) -> str:
    """``label text`` in lines of at most 79 columns (except a long unbreakable piece), later lines indented."""
    glued = _UNBREAKABLE.sub(lambda m: m.group().replace(" ", "\N{NO-BREAK SPACE}"), f"{label} {text}")
    lines = textwrap.fill(glued, width=79, subsequent_indent="    ", break_on_hyphens=False, break_long_words=False)
    return lines.replace("\N{NO-BREAK SPACE}", " ")


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one thread: on tensors this small, more threads only wait for each other (on a busy
    machine, seconds instead of milliseconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _run(checker: _Checker, fn: Callable[..., Any]) -> CheckResult:
    # The gradients are part of the check, also where the caller turned autograd off.
    with _one_thread(), torch.inference_mode(False), torch.enable_grad():
        result = _result(checker, fn)
    print(result.report)
    return result


def _result(checker: _Checker, fn: Callable[..., Any]) -> CheckResult:
    name, cases = _name(fn), checker.cases
    for seed, case in enumerate(cases):
        failure = _run_case(checker, fn, case, seed)
        if failure is not None:
            break
    else:
        report = _paragraph(
            f"{name} passes all {len(cases)} cases:",
            "; ".join(c.name for c in cases) + ". In each, its output and its gradients with respect to "
            f"{checker.gradients} equal those of {checker.reference}, in float64.",
        )
        return CheckResult(True, cases, None, "", None, report)
    expected = checker.inputs(case, seed).reference()
    mistake = failure.mistake or (_diagnose(checker, fn, seed) if failure.forward else None)
    lines = [_paragraph(f"{name} fails case {seed + 1} of {len(cases)}:", f"{case.name}."),
             _paragraph("Sizes:", checker.sizes(case) + ".")]
    if seed:
        lines.append(_paragraph("It passes the cases before it:", "; ".join(c.name for c in cases[:seed]) + "."))
    lines.append(_paragraph("Expected:", f"a tensor {checker.output} = {_shape(expected.shape)}, equal to the output "
                                         f"of {checker.reference}, and the same gradients."))
    lines.append(_paragraph("Got:", failure.problem + ("" if failure.problem.endswith(".") else ".")))
    if mistake is not None:
        lines.append(_paragraph("Likely mistake:", f"{mistake.what}. {mistake.why}"))
        lines.append(_paragraph("Read:", mistake.where() + "."))
    else:
        guide = _where(*checker.guide)
        lines.append(_paragraph("No known mistake gives this result.", f"Compare your function with {guide}."))
    report = "\n".join(lines)
    return CheckResult(False, cases, case, failure.problem, mistake, report)


def check_dynamic_conv(fn: Callable[..., Any]) -> CheckResult:
    """Check ``fn(x, bank, attention, bias=None, stride=1, padding=0, dilation=1, groups=1)``, a 2-D
    dynamic convolution with the signature of :func:`~dyconv_teach.functional.dynamic_conv2d`,
    against the per-sample loop, on :data:`CONV_CASES`.

    ``fn`` is called with the arguments in that order: ``x`` ``[B, C, H, W]``, the bank
    ``[K, O, C/g, k, k]``, the attention ``[B, K]``, the bias bank ``[K, O]`` or ``None``, and
    ints. Prints what it found (the first failing case, what came back, the mistake if it is a
    known one and the section that explains it; or the cases passed) and returns it.

    Examples::

        >>> from dyconv_teach import dynamic_conv2d
        >>> result = check_dynamic_conv(dynamic_conv2d)  # prints "dynamic_conv2d passes all 9 cases: ..."
        >>> result.passed
        True
    """
    return _run(_CONV, fn)


def check_attention(fn: Callable[..., Any]) -> CheckResult:
    """Check ``fn(x, fc1, fc2, temperature)``, the attention branch of a dynamic convolution, against
    :meth:`~dyconv_teach.layers.DynamicConv2d.attention`, on :data:`ATTENTION_CASES`.

    ``fn`` gets ``x`` ``[B, C, H, W]``, the branch's two ``nn.Linear`` layers (``fc1`` from ``C``
    to the hidden width, ``fc2`` from it to ``K``) and the temperature ``tau``, and must return
    ``pi = softmax(fc2(relu(fc1(avgpool(x)))) / tau)``, ``[B, K]``. The gradients with respect to
    ``x`` and to both layers' parameters are compared too. Prints and returns what it found, as
    :func:`check_dynamic_conv` does.
    """
    return _run(_ATTENTION, fn)
