"""Wiring diagrams of grouped convolution and of the batch-as-groups trick.

Both functions return a figure already closed in pyplot: a notebook cell shows
it exactly once when it returns or displays it, and ``fig = draw_...()``
shows nothing; :mod:`dyconv_teach.widgets` saves it as SVG.
Channels are dots: inputs on the top row, outputs on the bottom row; a line
joins an input channel to every output channel whose kernel reads it.
"""

from __future__ import annotations

from typing import Any, List, Sequence

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = ["draw_group_wiring", "draw_batch_as_groups"]

_TOP, _BOTTOM = 1.0, 0.0


def _check_divides(g: int, **channels: int) -> None:
    """Raise a ValueError naming the channel count that ``g`` does not divide."""
    if g < 1:
        raise ValueError(f"g must be >= 1, got {g}")
    for name, n in channels.items():
        if n < 1 or n % g:
            raise ValueError(f"g={g} must divide {name}={n} (each group gets {name}/g channels)")


def _row_x(n: int, width: float) -> List[float]:
    """``n`` evenly spaced x positions centred in ``[0, width]``."""
    step = width / n
    return [step * (i + 0.5) for i in range(n)]


def _wire_groups(
    ax: Axes, n_in: int, n_out: int, groups: int, colors: Sequence[Any], width: float, labels: Sequence[str]
) -> None:
    """Draw ``n_in`` input and ``n_out`` output dots split into ``groups`` equal
    blocks, block ``j`` in ``colors[j]``, fully wired within each block only."""
    xs_in, xs_out = _row_x(n_in, width), _row_x(n_out, width)
    c, o = n_in // groups, n_out // groups
    for j in range(groups):
        color = colors[j]
        for i in range(j * c, (j + 1) * c):
            for m in range(j * o, (j + 1) * o):
                ax.plot([xs_in[i], xs_out[m]], [_TOP, _BOTTOM], color=color, alpha=0.45, lw=1, zorder=1)
        ax.scatter(xs_in[j * c : (j + 1) * c], [_TOP] * c, s=90, color=color, edgecolor="black", zorder=2)
        ax.scatter(xs_out[j * o : (j + 1) * o], [_BOTTOM] * o, s=90, marker="s", color=color, edgecolor="black",
                   zorder=2)
        left = (xs_in[j * c] + xs_out[j * o]) / 2 - 0.3
        right = (xs_in[(j + 1) * c - 1] + xs_out[(j + 1) * o - 1]) / 2 + 0.3
        ax.text((left + right) / 2, 0.5, labels[j], ha="center", va="center", fontsize=9,
                bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": color})


def _finish(fig: Figure, ax: Axes, width: float, top: str, bottom: str) -> None:
    """Name the two rows, hide the axes, lay the figure out and detach it from pyplot."""
    ax.text(-0.2, _TOP, top, ha="right", va="center", fontsize=10)
    ax.text(-0.2, _BOTTOM, bottom, ha="right", va="center", fontsize=10)
    ax.set_xlim(-0.2, width + 0.2)
    ax.set_ylim(-0.35, 1.35)
    ax.axis("off")
    fig.tight_layout()
    # Closed, so the inline backend does not show it a second time at the end of the cell.
    plt.close(fig)


def draw_group_wiring(C: int, O: int, g: int) -> Figure:
    """Grouped convolution: ``C`` input channels in ``g`` colored groups, each
    wired only to the ``O/g`` output channels (one kernel each) of its group.

    Raises:
        ValueError: if ``g`` does not divide ``C`` and ``O``.
    """
    _check_divides(g, C=C, O=O)
    width = float(max(C, O))
    fig, ax = plt.subplots(figsize=(1.6 + 0.45 * width, 2.2))
    colors = [plt.get_cmap("tab10")(j % 10) for j in range(g)]
    labels = [f"group {j}" if width / g >= 2 else str(j) for j in range(g)]
    _wire_groups(ax, C, O, g, colors, width, labels)
    ax.set_title(f"g={g}: each kernel [C/g, k, k] reads {C // g} of the {C} input channels", fontsize=10)
    _finish(fig, ax, width, f"input C={C}", f"output O={O}")
    return fig


def draw_batch_as_groups(B: int, C: int, O: int, g: int = 1) -> Figure:
    """The batch-as-groups trick: ``B`` samples of ``C`` channels become one
    sample of ``B*C`` channels in ``B*g`` groups; group ``(b, j)`` meets only
    sample ``b``'s aggregated kernels, and the ``B*O`` outputs view back to
    ``[B, O, H', W']``. Colors mark samples, labels ``b.j`` mark groups.

    Raises:
        ValueError: if ``g`` does not divide ``C`` and ``O``.
    """
    _check_divides(g, C=C, O=O)
    if B < 1:
        raise ValueError(f"B must be >= 1, got {B}")
    width = float(B * max(C, O))
    fig, ax = plt.subplots(figsize=(2.4 + 0.38 * width, 2.8))
    tab10 = plt.get_cmap("tab10")
    colors = [tab10(b % 10) for b in range(B) for _ in range(g)]
    labels = [f"W_{b}" if g == 1 else f"W_{b}.{j}" for b in range(B) for j in range(g)]
    _wire_groups(ax, B * C, B * O, B * g, colors, width, labels)
    for b, x in enumerate(_row_x(B, width)):
        ax.text(x, 1.22, f"sample b={b}", ha="center", va="center", fontsize=9, color=tab10(b % 10))
        ax.text(x, -0.22, f"out[{b}]", ha="center", va="center", fontsize=9, color=tab10(b % 10))
    ax.set_title(f"groups = B*g = {B * g}: sample b meets only its own kernels W_b;\n"
                 f"the output [1, B*O, H', W'] is viewed back to [B={B}, O={O}, H', W']", fontsize=10)
    _finish(fig, ax, width, f"x.reshape(1, B*C={B * C}, H, W)", f"[1, B*O={B * O}, H', W']")
    return fig
