"""One sentence, in the book's notation, for each error an explorer can show.

Torch names tensors by position: "expected weight to be divisible by 3 at
dimension 0". Beside each such message the explorers show a sentence computed
from the shapes of the failed call: which axis of which tensor, which symbol of
the book it holds (``B, C, O, K, g, k, H``) and what its numbers had to satisfy.
:func:`conv2d_problem` makes ``F.conv2d``'s checks in torch's order, so its
sentence explains the message torch printed; :func:`groups_problem` explains
``nn.Conv2d``'s check that ``g`` divides ``C`` and ``O``.

Both return ``None`` when torch accepts the arguments, so a test can hold them
against torch over every setting an explorer reaches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from .shapes import Shape, shape_text

__all__ = ["Symbols", "NAIVE_5D", "BLOG_VIEW", "conv2d_problem", "groups_problem"]


@dataclass(frozen=True)
class Symbols:
    """What each axis of an ``F.conv2d`` call's tensors means, in the book's symbols.

    For the batch-as-groups call: ``Symbols(("1", "B*C", "H", "W"), ("B*O", "C/g", "k", "k"), "B*g")``.
    """

    input: Tuple[str, ...]
    weight: Tuple[str, ...]
    groups: str


#: The first thing everyone tries, ``F.conv2d(x, weight)`` with one kernel per sample (a 5-D weight).
NAIVE_5D = Symbols(("B", "C", "H", "W"), ("B", "O", "C/g", "k", "k"), "g")

#: The blog post's call, ``x.view(1, -1, H, W)`` and the weight ``.view(O, -1, k, k)``, ``groups = g*B``.
BLOG_VIEW = Symbols(("1", "B*C", "H", "W"), ("O", "B*C/g", "k", "k"), "g*B")


def _named(symbols: Tuple[str, ...], shape: Shape) -> str:
    """``"[O, C/g, k, k] = [6, 2, 3, 3]"``."""
    return f"[{', '.join(symbols)}] = {shape_text(shape)}"


def _value(symbol: str, value: int) -> str:
    """``"O = 6"``, or just ``"6"`` when the symbol is the number itself."""
    return str(value) if symbol == str(value) else f"{symbol} = {value}"


def conv2d_problem(
    input: Shape, weight: Shape, groups: int, symbols: Symbols, padding: int = 0, dilation: int = 1
) -> Optional[str]:
    """Why ``F.conv2d`` rejects these shapes, as one sentence; ``None`` if it accepts them.

    ``input`` is 4-D ``[N, C_in, H, W]``; ``weight`` should be ``[O, C_in/groups, kH, kW]``;
    ``padding`` and ``dilation`` are single ints, as in the explorers (the stride
    never makes a call fail: it only skips output positions).
    """
    w_in, w_out = symbols.weight, symbols.input
    g = _value(symbols.groups, groups)
    if len(weight) != len(input):
        return (
            f"The weight {_named(w_in, weight)} has {len(weight)} axes, so torch reads the call as a "
            f"{len(weight) - 2}-D convolution and asks for {len(weight) - 2} strides; F.conv2d takes a "
            f"{len(input)}-D weight, a single kernel for the whole batch, with no axis for "
            f"{_value(w_in[0], weight[0])}."
        )
    if weight[0] < groups:
        return (
            f"groups = {g} asks for {groups} groups of filters along axis 0 of the weight "
            f"{_named(w_in, weight)}, which holds only {_value(w_in[0], weight[0])} filters."
        )
    if weight[0] % groups:
        return (
            f"groups = {g} must split the {_value(w_in[0], weight[0])} filters on axis 0 of the weight "
            f"{_named(w_in, weight)} into equal groups, and {groups} does not divide {weight[0]}."
        )
    if input[1] != weight[1] * groups:
        return (
            f"Each of the groups = {g} groups reads {_value(w_in[1], weight[1])} channels (axis 1 of the "
            f"weight {_named(w_in, weight)}), so torch expects {weight[1]} * {groups} = {weight[1] * groups} "
            f"input channels, but axis 1 of the input {_named(w_out, input)} holds {_value(w_out[1], input[1])}."
        )
    for axis in (2, 3):
        size, k = input[axis], weight[axis]
        span = dilation * (k - 1) + 1
        if span > size + 2 * padding:
            return (
                f"The kernel spans dilation*({w_in[axis]} - 1) + 1 = {dilation}*({k} - 1) + 1 = {span} pixels, "
                f"more than the padded input's {w_out[axis]} + 2*padding = {size} + 2*{padding} = "
                f"{size + 2 * padding}, so no output position exists ({w_out[axis]}' would be < 1)."
            )
    return None


def groups_problem(C: int, O: int, g: int) -> Optional[str]:
    """Why ``nn.Conv2d(C, O, k, groups=g)`` rejects ``g``, as one sentence; ``None`` if it accepts it."""
    reads, writes = f"C/g = {C}/{g}", f"O/g = {O}/{g}"
    if C % g and O % g:
        return (
            f"Each of the g = {g} groups reads C/g input channels and writes O/g output channels, and neither "
            f"{reads} nor {writes} is a whole number: g must divide both C and O."
        )
    if C % g:
        return f"Each of the g = {g} groups reads C/g input channels, and {reads} is not whole: g must divide C."
    if O % g:
        return f"Each of the g = {g} groups writes O/g output channels, and {writes} is not whole: g must divide O."
    return None
