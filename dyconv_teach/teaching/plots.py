"""The book's diagrams, drawn by code from real tensors.

- :func:`draw_dynamic_convolution`: dynamic convolution itself, after Figure 3 of
  Chen et al. (CVPR 2020), with every box labelled by the shape of the tensor a
  real :class:`~dyconv_teach.layers.DynamicConv2d` forward makes there.
- :func:`draw_gradient_flow`: its backward pass, the same boxes with the gradients' way back from the
  output to the bank, the attention, the attention branch's linear layers and the input.
- :func:`draw_channel_layouts`: which sample's channels and kernels land where in
  ``x.reshape(1, B*C, H, W)``, in the blog post's weight ``[O, B*C/g, k, k]`` and
  in the correct ``[B*O, C/g, k, k]``, read off reshaped tensors.
- :func:`draw_group_wiring`, :func:`draw_batch_as_groups`: wiring diagrams of
  grouped convolution and of the batch-as-groups trick. Channels are dots, inputs
  on the top row, outputs on the bottom row; a line joins an input channel to
  every output channel whose kernel reads it.
- :func:`draw_family_parameters`: the parameters of one layer of each variant of the family
  (chapter 11), by part, counted from the layers' own parameters.
- :func:`drawn_shapes`: every shape written in a figure, with the name of the
  label that holds it, so a page can hold each label against its real tensor.

Notation: ``k`` is the kernel size; the bank ``Theta`` ``[K, O, C/g, k, k]`` holds
the K kernels ``Theta_j``; sample ``b``'s mixed kernel is
``Theta~_b = sum_j pi[b, j] Theta_j``. Every function returns a figure already
closed in pyplot: a notebook cell shows it exactly once when it returns or
displays it, and ``fig = draw_...()`` shows nothing; :mod:`dyconv_teach.teaching.explorer`
saves it as SVG.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layers import DynamicConv2d
from . import _book_extra_error
from .explain import BLOG_VIEW, conv2d_problem
from .shapes import Shape, shape_text

try:
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyBboxPatch, Rectangle
except ImportError as missing:
    raise _book_extra_error(__name__, missing) from missing

__all__ = ["draw_dynamic_convolution", "draw_gradient_flow", "draw_channel_layouts", "draw_group_wiring",
           "draw_batch_as_groups", "draw_implicit_gemm", "draw_family_parameters", "drawn_shapes"]

_TOP, _BOTTOM = 1.0, 0.0
_SHAPE = re.compile(r"\[(\d+(?:, \d+)*)\]")
#: Samples drawn in full by :func:`draw_batch_as_groups`; a larger batch shows its first
#: samples, an ellipsis and its last sample, so the labels keep a readable size.
MAX_DRAWN_SAMPLES = 4


def _color(i: int) -> Any:
    """The ``i``-th color of the figures' palette: of a sample, or of a group."""
    return plt.get_cmap("tab10")(i % 10)


def _close(fig: Figure) -> Figure:
    # Closed, so the inline backend does not show it a second time at the end of the cell.
    plt.close(fig)
    return fig


def drawn_shapes(fig: Figure) -> List[Tuple[Optional[str], Shape]]:
    """Every shape written in ``fig``, as ``(name, shape)`` in drawing order.

    ``name`` is the label's gid: :func:`draw_dynamic_convolution` names its labels
    ``x, avgpool, fc1, relu, logits, pi, bank, kernel, mix, y``; :func:`draw_channel_layouts`
    names them ``x, blog, correct`` and ``why`` (the sentence under the blog's weight,
    which names two shapes); :func:`draw_implicit_gemm` names them ``A, W, out, bank``
    (each matrix's label also gives its tile's shape). A label without a gid gives ``None``.
    """
    found: List[Tuple[Optional[str], Shape]] = []
    for ax in fig.axes:
        for text in ax.texts:
            for match in _SHAPE.finditer(text.get_text().replace("\u00a0", " ")):
                found.append((text.get_gid(), tuple(int(n) for n in match.group(1).split(", "))))
    return found


# -- dynamic convolution, after the paper's Figure 3 ---------------------------------------------


def _box(ax: Axes, x: float, y: float, name: str, shape: Optional[Shape], gid: str, color: Any = "#f6f8fa",
         width: float = 2.0, fontsize: float = 10) -> None:
    """A box centred at ``(x, y)``, labelled ``name`` over ``shape`` (``name`` alone for no shape);
    ``gid`` names the label."""
    ax.add_patch(FancyBboxPatch((x - width / 2, y - 0.3), width, 0.6, boxstyle="round,pad=0.04",
                                facecolor=color, edgecolor="#57606a", lw=1))
    label = name if shape is None else f"{name}\n{shape_text(shape)}"
    ax.text(x, y, label, ha="center", va="center", fontsize=fontsize, gid=gid)


def _arrow(ax: Axes, *points: Tuple[float, float], color: str = "#57606a") -> None:
    """A line through ``points`` with an arrow head at the last one."""
    xs, ys = zip(*points)
    ax.plot(xs[:-1], ys[:-1], color=color, lw=1.2)
    ax.annotate("", xy=points[-1], xytext=points[-2], arrowprops={"arrowstyle": "-|>", "color": color,
                                                                  "lw": 1.2, "shrinkA": 0, "shrinkB": 0})


def _stack(ax: Axes, x: float, y: float, labels: Sequence[str]) -> Tuple[float, float]:
    """Blocks piled from ``(x, y)`` up and to the right, the first in front; returns the pile's top right."""
    w, h, dx, dy = 0.9, 0.55, 0.22, 0.2
    for i in reversed(range(len(labels))):
        left, bottom = x + dx * i, y + dy * i
        ax.add_patch(Rectangle((left, bottom), w, h, facecolor="#fff8c5", edgecolor="#1f2328", lw=0.8))
        # The front block shows its label in the middle, the others in the strip left visible.
        at = (left + w / 2, bottom + h / 2) if i == 0 else (left + w - 0.2, bottom + h - 0.1)
        ax.text(*at, labels[i], ha="center", va="center", fontsize=9 if i == 0 else 7)
    return x + dx * (len(labels) - 1) + w, y + dy * (len(labels) - 1) + h


def _forward_shapes(layer: DynamicConv2d, x: Tensor) -> Tuple[Dict[str, Shape], Tensor, Tensor]:
    """Run ``layer`` on ``x`` without gradients: the shapes of the attention branch's linear layers'
    inputs and outputs (``"fc1 in"``, ``"fc1"``, ``"fc2 in"``, ``"fc2"``), the output and ``pi``."""
    seen: Dict[str, Shape] = {}

    def record(name: str) -> Any:
        def hook(_module: Any, inputs: Tuple[Tensor, ...], output: Tensor) -> None:
            seen[f"{name} in"], seen[name] = tuple(inputs[0].shape), tuple(output.shape)
        return hook

    handles = [layer.fc1.register_forward_hook(record("fc1")), layer.fc2.register_forward_hook(record("fc2"))]
    try:
        with torch.no_grad():
            y = layer(x)
    finally:
        for handle in handles:
            handle.remove()
    pi = layer.last_attention
    assert pi is not None  # set by the forward above
    return seen, y, pi


def draw_dynamic_convolution(layer: DynamicConv2d, x: Tensor) -> Figure:
    """Dynamic convolution of ``x`` ``[B, C, H, W]`` by ``layer``, every box labelled with its shape.

    The shapes are those of a real forward pass: the attention branch (avgpool,
    FC, ReLU, FC, softmax or sigmoid of logits / tau) gives ``pi`` ``[B, K]``; the
    bank ``Theta`` ``[K, O, C/g, k, k]`` holds the K kernels ``Theta_j``; the mix
    ``Theta~_b = sum_j pi[b, j] Theta_j`` gives one kernel per sample
    ``[B, O, C/g, k, k]``; convolving sample ``b`` with ``Theta~_b`` gives
    ``y`` ``[B, O, H', W']``.
    """
    seen, y, pi = _forward_shapes(layer, x)
    K = layer.num_kernels
    bank = layer.bank.detach()  # [K, O, C/g, kH, kW]
    mixed = torch.einsum("bj,j...->b...", pi, bank)  # Theta~_b = sum_j pi[b, j] Theta_j

    fig, ax = plt.subplots(figsize=(5.6, 6.6))
    left, right, blue, green = 1.45, 4.3, "#ddf4ff", "#effaf1"
    squash = "softmax" if layer.routing == "softmax" else "sigmoid"
    chain = [("x", "x", tuple(x.shape)), ("avgpool", "avgpool", seen["fc1 in"]), ("fc1", "FC", seen["fc1"]),
             ("relu", "ReLU", seen["fc2 in"]), ("logits", "FC: logits", seen["fc2"]),
             ("pi", f"$\\pi$ = {squash}(logits / $\\tau$)", tuple(pi.shape))]
    ys = [6.7 - 1.0 * i for i in range(len(chain))]
    for i, ((gid, name, shape), cy) in enumerate(zip(chain, ys)):
        _box(ax, left, cy, name, shape, gid, color="#f6f8fa" if i == 0 else blue)
        if i:
            _arrow(ax, (left, ys[i - 1] - 0.34), (left, cy + 0.34))
    ax.text(left + 1.1, (ys[1] + ys[-1]) / 2, f"attention branch\n$\\tau$ = {layer.temperature:g}", rotation=90,
            ha="left", va="center", fontsize=9, color="#0969da")
    y_pi = ys[-1]

    shown = min(K, 5)
    labels = [f"$\\Theta_{{{j}}}$" for j in range(shown)]
    if shown < K:
        labels[-2:] = ["...", f"$\\Theta_{{{K - 1}}}$"]
    top_right = _stack(ax, right - 0.9, 4.3, labels)
    ax.text(right, top_right[1] + 0.15, f"bank $\\Theta$, K = {K} kernels\n{shape_text(tuple(bank.shape))}",
            ha="center", va="bottom", fontsize=10, gid="bank")
    ax.text(right, 4.2, f"each $\\Theta_j$ {shape_text(tuple(bank.shape[1:]))}", ha="center", va="top", fontsize=9,
            gid="kernel")
    _box(ax, right, y_pi, "mix $\\Sigma_j\\,\\pi_{b,j}\\,\\Theta_j$", tuple(mixed.shape), "mix", color="#fff8c5",
         width=2.4)
    _arrow(ax, (right, 3.75), (right, y_pi + 0.34))
    _arrow(ax, (left + 1.0, y_pi), (right - 1.24, y_pi))
    ax.text(right, y_pi - 0.38, "one kernel $\\tilde\\Theta_b$ per sample", ha="center", va="top", fontsize=9)

    y_out = y_pi - 1.6
    # y_b = Theta~_b * x_b + beta~_b, in the text's notation (no beta~ for a layer without biases).
    rule = "$\\tilde\\Theta_b * x_b$" if layer.bias is None else "$\\tilde\\Theta_b * x_b + \\tilde\\beta_b$"
    _box(ax, right, y_out, f"y: {rule}", tuple(y.shape), "y", color=green, width=2.4)
    _arrow(ax, (right, y_pi - 0.75), (right, y_out + 0.34))
    # x also goes straight to the convolution, down the left margin.
    _arrow(ax, (left - 1.0, ys[0]), (0.2, ys[0]), (0.2, y_out), (right - 1.24, y_out))
    ax.set_xlim(0, 5.6)
    ax.set_ylim(y_out - 0.5, 7.1)
    ax.axis("off")
    fig.tight_layout()
    return _close(fig)


def draw_gradient_flow(layer: DynamicConv2d, x: Tensor) -> Figure:
    """The backward pass of ``layer`` on ``x`` ``[B, C, H, W]``: the boxes of
    :func:`draw_dynamic_convolution`, each labelled with the shape of its tensor (which its gradient
    shares), and red arrows that carry the gradients from the output back to the bank, the attention,
    the attention branch's linear layers and the input, each labelled with the rule of its step.

    The attention branch is ``m = avgpool(x)``, ``s = fc1(m) = U m + gamma``, ``r = ReLU(s)``,
    ``z = fc2(r) = V r + delta``, ``pi = softmax(z / tau)`` (``gamma`` and ``delta`` are the biases of
    ``fc1`` and ``fc2``: ``u, v`` are the offsets inside a kernel's window in chapter 2); ``grad t`` is
    the gradient of the loss with respect to ``t``. ``x`` receives gradient by two paths: through the
    convolution (transposed, with ``Theta~_b``) and through the attention branch (the pooling spreads
    ``grad m / (H W)`` over the pixels).

    Raises:
        ValueError: for a layer whose routing is not ``'softmax'``.
    """
    if layer.routing != "softmax":
        raise ValueError(f"draws the softmax routing (the paper's), got routing={layer.routing!r}")
    seen, y, pi = _forward_shapes(layer, x)
    bank = tuple(layer.bank.shape)
    mixed = (pi.shape[0], *bank[1:])  # Theta~ [B, O, C/g, k, k]: sum_j pi[b, j] Theta_j
    bank_text, mix_text = f"bank $\\Theta$\n{shape_text(bank)}", f"mix $\\tilde\\Theta$\n{shape_text(mixed)}"
    bias_rules = ["", "", ""]  # the bias's share of the mixed kernel's, the bank's and pi's gradient
    if layer.bias is not None:  # beta [K, O]
        bank_text = f"bank $\\Theta$, $\\beta$\n{shape_text(bank)}, {shape_text(tuple(layer.bias.shape))}"
        mixed_bias = (pi.shape[0], bank[1])  # beta~ [B, O]
        mix_text = f"mix $\\tilde\\Theta$, $\\tilde\\beta$\n{shape_text(mixed)}, {shape_text(mixed_bias)}"
        bias_rules = [";\n$\\nabla\\tilde\\beta_b$: $\\nabla y_b$ summed\nover the pixels",
                      "\n$\\nabla\\beta_j = \\Sigma_b\\, \\pi_{b,j}\\, \\nabla\\tilde\\beta_b$",
                      "\n$+ \\langle\\nabla\\tilde\\beta_b, \\beta_j\\rangle$"]

    # Fonts of 11 points on a figure 6.5 inches wide stay readable when a phone shows it 360 pixels wide.
    fig, ax = plt.subplots(figsize=(6.5, 9.0))
    red, size = "#cf222e", 11

    def note(x0: float, y0: float, text: str, **options: Any) -> None:
        ax.text(x0, y0, text, **{"ha": "left", "va": "center", "fontsize": size, "color": red, **options})

    left, right, w_left, w_right = 1.5, 4.8, 2.1, 2.6
    chain = [("x", "x", tuple(x.shape)), ("avgpool", "$m$: avgpool", seen["fc1 in"]),
             ("fc1", "$s$: fc1 ($U$, $\\gamma$)", seen["fc1"]), ("relu", "$r$: ReLU", seen["fc2 in"]),
             ("logits", "$z$: fc2 ($V$, $\\delta$)", seen["fc2"]),
             ("pi", "$\\pi$ = softmax($z / \\tau$)", tuple(pi.shape))]
    # The rule that takes each box's gradient to the box above it.
    rules = ["$1 / (HW)$ to every pixel", "$\\times\\, U^\\top$;  $\\nabla U = \\Sigma_b\\, \\nabla s_b\\, m_b^\\top$",
             "$\\odot\\, [s_b > 0]$", "$\\times\\, V^\\top$;  $\\nabla V = \\Sigma_b\\, \\nabla z_b\\, r_b^\\top$",
             "$\\times\\, (\\mathrm{diag}\\, \\pi_b - \\pi_b \\pi_b^\\top) / \\tau$"]
    ys = [7.9 - 1.15 * i for i in range(len(chain))]
    for i, ((gid, name, shape), cy) in enumerate(zip(chain, ys)):
        _box(ax, left, cy, name, shape, gid, color="#f6f8fa" if i == 0 else "#ddf4ff", width=w_left,
             fontsize=size)
        if i:
            _arrow(ax, (left, cy + 0.34), (left, ys[i - 1] - 0.34), color=red)
            note(left + 0.12, cy + 0.575, rules[i - 1])
    y_pi = ys[-1]

    y_bank, y_out = y_pi + 2.6, y_pi - 2.3
    _box(ax, right, y_bank, bank_text, None, "bank", color="#fff8c5", width=w_right, fontsize=size)
    _box(ax, right, y_pi, mix_text, None, "mix", color="#fff8c5", width=w_right, fontsize=size)
    _box(ax, right, y_out, "y", tuple(y.shape), "y", color="#effaf1", width=w_right, fontsize=size)
    _arrow(ax, (right + 0.5, y_out - 1.0), (right + 0.5, y_out - 0.34), color=red)
    note(right + 0.6, y_out - 0.75, "$\\nabla y$ from\nthe loss")
    _arrow(ax, (right, y_out + 0.34), (right, y_pi - 0.34), color=red)
    note(right + 0.1, (y_out + y_pi) / 2,
         "$\\nabla\\tilde\\Theta_b$: weight\ngradient of the\nconvolution of $x_b$" + bias_rules[0])
    _arrow(ax, (right, y_pi + 0.34), (right, y_bank - 0.34), color=red)
    note(right + 0.1, (y_pi + y_bank) / 2,
         "$\\nabla\\Theta_j = \\Sigma_b\\, \\pi_{b,j}\\, \\nabla\\tilde\\Theta_b$" + bias_rules[1])
    _arrow(ax, (right - w_right / 2 - 0.04, y_pi), (left + w_left / 2 + 0.04, y_pi), color=red)
    note(left + 0.12, y_pi - 0.45,
         "$\\nabla\\pi_{b,j} = \\langle\\nabla\\tilde\\Theta_b, \\Theta_j\\rangle$" + bias_rules[2], va="top")
    # The convolution's path back to x, up the left margin: the transposed convolution with Theta~_b.
    _arrow(ax, (right - w_right / 2 - 0.04, y_out), (0.12, y_out), (0.12, ys[0]), (left - w_left / 2 - 0.04, ys[0]),
           color=red)
    note(0.2, (ys[0] + y_out) / 2, "transposed conv of $\\nabla y_b$ with $\\tilde\\Theta_b$", rotation=90)
    note(left + w_left / 2 + 0.15, ys[0], "$\\nabla x$ = sum of the two paths:\nthe convolution's (left) and\n"
         "the attention branch's")
    note(right - w_right / 2 + 0.2, ys[1] - 0.6, "red: the backward pass;\n$\\nabla t$ is the gradient of\n"
         "the loss with respect\nto $t$, of $t$'s shape")
    ax.set_xlim(0, 6.5)
    ax.set_ylim(y_out - 1.1, ys[0] + 0.45)
    ax.axis("off")
    fig.tight_layout()
    return _close(fig)


# -- where the channels land -----------------------------------------------------------------------


def _cells(ax: Axes, x0: float, y0: float, owner: Tensor, text: Sequence[Sequence[str]], fontsize: float = 9) -> None:
    """One unit cell per entry of ``owner`` ``[rows, cols]``, row 0 on top with its top edge at ``y0``,
    coloured by the sample that owns it."""
    rows, cols = owner.shape
    for r in range(rows):
        for c in range(cols):
            ax.add_patch(Rectangle((x0 + c, y0 - r - 1), 1, 1, facecolor=_color(int(owner[r, c])),
                                   alpha=0.55, edgecolor="white", lw=1.5))
            ax.text(x0 + c + 0.5, y0 - r - 0.5, text[r][c], ha="center", va="center", fontsize=fontsize)


def draw_channel_layouts(B: int, C: int, O: int, g: int = 1, k: int = 3, H: int = 9) -> Figure:
    """Which sample owns each channel of ``x.reshape(1, B*C, H, W)`` and each kernel
    slice of the two weight layouts, the blog post's ``[O, B*C/g, k, k]`` and the
    correct ``[B*O, C/g, k, k]``. Colours mark samples.

    A weight's cell is one ``k x k`` slice (row: axis 0, the kernels; column: axis 1,
    the input channels), labelled ``o,c``: the output and input channel it had in its
    sample's kernel ``[O, C/g, k, k]``. The layouts are read off real reshapes of
    tensors that hold their own indices.

    Raises:
        ValueError: if ``g`` does not divide ``C`` and ``O``, or ``B < 1``.
    """
    _check_divides(g, C=C, O=O)
    if B < 1:
        raise ValueError(f"B must be >= 1, got {B}")
    c_g = C // g
    # Every entry holds its own index, so the reshapes say where each one goes.
    x = torch.arange(B * C).reshape(B, C, 1, 1).expand(B, C, H, H)
    folded = x.reshape(1, B * C, H, H)
    kernels = torch.arange(B * O * c_g).reshape(B, O, c_g, 1, 1).expand(B, O, c_g, k, k)
    blog = kernels.reshape(O, -1, k, k)  # the blog's .view(out_planes, -1, k, k) (reshape: kernels is expanded)
    correct = kernels.reshape(B * O, c_g, k, k)

    def owners(w: Tensor) -> Tuple[Tensor, List[List[str]]]:
        index = w[:, :, 0, 0]
        o, c = index % (O * c_g) // c_g, index % c_g
        return index // (O * c_g), [[f"{int(a)},{int(b)}" for a, b in zip(ro, rc)] for ro, rc in zip(o, c)]

    problem = conv2d_problem(tuple(folded.shape), tuple(blog.shape), g * B, BLOG_VIEW)
    # No line break inside a shape: its spaces become non-breaking ones, which textwrap keeps.
    unbroken = re.sub(r"\[[^\]]*\]", lambda m: m.group().replace(" ", "\u00a0"),
                      problem or "B = 1: the blog's .view gives the correct layout.")
    # Fonts of 11 and 12 points: the book's figure (B = 2, C = 4, O = 6) stays readable when a phone
    # shows it 360 pixels wide. A cell is 0.42 inch, about five characters of 11 points; the note
    # under the blog's weight may reach into the gap before the correct weight.
    small, large, gap = 11, 12, 2.5
    why = textwrap.fill(unbroken, max(30, int(5 * (blog.shape[1] + gap - 0.5))))
    under = 0.65 * (why.count("\n") + 1) + 0.7 * B + 1.0  # the note and the legend under the blog's weight
    width = blog.shape[1] + gap + correct.shape[1]
    rows = max(correct.shape[0], blog.shape[0] + under)
    height = 4.4 + rows
    fig, ax = plt.subplots(figsize=(0.42 * width + 0.6, 0.42 * height))
    channels = folded[0, :, 0, 0]
    _cells(ax, 0, height - 1.2, (channels // C)[None], [[f"c{int(i) % C}" for i in channels]], small)
    ax.text(0, height - 1.0, f"x.reshape(1, B*C, H, W) {shape_text(tuple(folded.shape))}: channel axis",
            fontsize=large, va="bottom", gid="x")
    top = height - 4.4
    _cells(ax, 0, top, *owners(blog), small)
    ax.text(0, top + 0.2, f"blog: .view(O, -1, k, k)\n{shape_text(tuple(blog.shape))}, axis 1 = B*C/g",
            fontsize=large, va="bottom", gid="blog")
    ax.text(0, top - blog.shape[0] - 0.4, why, fontsize=small, va="top", gid="why")
    for b in range(B):
        y = top - rows + 0.7 * (B - b) - 0.6
        ax.add_patch(Rectangle((0, y), 0.8, 0.5, facecolor=_color(b), alpha=0.55))
        ax.text(1.0, y + 0.25, f"sample b={b}", fontsize=small, va="center")
    x_ok = blog.shape[1] + gap
    _cells(ax, x_ok, top, *owners(correct), small)
    ax.text(x_ok, top + 0.2, f"correct:\n{shape_text(tuple(correct.shape))}", fontsize=large, va="bottom",
            gid="correct")
    ax.set_xlim(-0.1, width + 0.1)
    ax.set_ylim(top - rows - 0.1, height)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.tight_layout()
    return _close(fig)


# -- wiring diagrams ----------------------------------------------------------------------------------


def _check_divides(g: int, **channels: int) -> None:
    """Raise a ValueError naming the channel count that ``g`` does not divide."""
    if g < 1:
        raise ValueError(f"g must be >= 1, got {g}")
    for name, n in channels.items():
        if n < 1 or n % g:
            raise ValueError(f"g={g} must divide {name}={n} (each group gets {name}/g channels)")


def _row_x(n: int, x0: float, width: float) -> List[float]:
    """``n`` evenly spaced x positions centred in ``[x0, x0 + width]``."""
    step = width / n
    return [x0 + step * (i + 0.5) for i in range(n)]


def _wire_groups(
    ax: Axes, n_in: int, n_out: int, groups: int, colors: Sequence[Any], x0: float, width: float,
    labels: Sequence[str], fontsize: float = 9,
) -> None:
    """Draw ``n_in`` input and ``n_out`` output dots in ``[x0, x0 + width]``, split into
    ``groups`` equal blocks, block ``i`` in ``colors[i]``, fully wired within each block only;
    block ``i`` is labelled ``labels[i]`` in ``fontsize`` points."""
    xs_in, xs_out = _row_x(n_in, x0, width), _row_x(n_out, x0, width)
    c, o = n_in // groups, n_out // groups
    for i in range(groups):
        color = colors[i]
        for a in range(i * c, (i + 1) * c):
            for m in range(i * o, (i + 1) * o):
                ax.plot([xs_in[a], xs_out[m]], [_TOP, _BOTTOM], color=color, alpha=0.45, lw=1, zorder=1)
        ax.scatter(xs_in[i * c : (i + 1) * c], [_TOP] * c, s=90, color=color, edgecolor="black", zorder=2)
        ax.scatter(xs_out[i * o : (i + 1) * o], [_BOTTOM] * o, s=90, marker="s", color=color, edgecolor="black",
                   zorder=2)
        left = (xs_in[i * c] + xs_out[i * o]) / 2 - 0.3
        right = (xs_in[(i + 1) * c - 1] + xs_out[(i + 1) * o - 1]) / 2 + 0.3
        ax.text((left + right) / 2, 0.5, labels[i], ha="center", va="center", fontsize=fontsize,
                bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": color})


def _finish(fig: Figure, ax: Axes, width: float, top: str, bottom: str) -> Figure:
    """Name the two rows, hide the axes, lay the figure out and detach it from pyplot."""
    ax.text(-0.2, _TOP, top, ha="right", va="center", fontsize=10)
    ax.text(-0.2, _BOTTOM, bottom, ha="right", va="center", fontsize=10)
    ax.set_xlim(-0.2, width + 0.2)
    ax.set_ylim(-0.35, 1.35)
    ax.axis("off")
    fig.tight_layout()
    return _close(fig)


def draw_group_wiring(C: int, O: int, g: int) -> Figure:
    """Grouped convolution: ``C`` input channels in ``g`` colored groups, each
    wired only to the ``O/g`` output channels (one filter each) of its group.

    Raises:
        ValueError: if ``g`` does not divide ``C`` and ``O``.
    """
    _check_divides(g, C=C, O=O)
    width = float(max(C, O))
    fig, ax = plt.subplots(figsize=(1.6 + 0.45 * width, 2.2))
    colors = [_color(i) for i in range(g)]
    labels = [f"group {i}" if width / g >= 2 else str(i) for i in range(g)]
    _wire_groups(ax, C, O, g, colors, 0.0, width, labels)
    ax.set_title(f"g={g}: each filter [C/g, k, k] reads {C // g} of the {C} input channels", fontsize=10)
    return _finish(fig, ax, width, f"input C={C}", f"output O={O}")


def draw_batch_as_groups(B: int, C: int, O: int, g: int = 1) -> Figure:
    """The batch-as-groups trick: ``B`` samples of ``C`` channels become one
    sample of ``B*C`` channels in ``B*g`` groups; the groups of sample ``b`` meet
    only its mixed kernels ``Theta~_b``, and the ``B*O`` outputs view back to
    ``[B, O, H', W']``. Colors mark samples; ``#i`` marks group ``i`` of a sample.
    A batch larger than ``MAX_DRAWN_SAMPLES`` draws its first samples, an
    ellipsis and its last sample.

    Raises:
        ValueError: if ``g`` does not divide ``C`` and ``O``, or ``B < 1``.
    """
    _check_divides(g, C=C, O=O)
    if B < 1:
        raise ValueError(f"B must be >= 1, got {B}")
    drawn = list(range(B)) if B <= MAX_DRAWN_SAMPLES else [*range(MAX_DRAWN_SAMPLES - 2), None, B - 1]
    block = float(max(C, O))
    width = block * len(drawn)
    # 0.28 inch per channel and 2.4 inches for the row names: four samples of the book's example
    # (C = 4, O = 6) fit the text column of a 1280 px page with no text under 8 px.
    fig, ax = plt.subplots(figsize=(2.4 + 0.28 * width, 2.8))
    for slot, b in enumerate(drawn):
        x0 = slot * block
        if b is None:
            hidden = f"b = {MAX_DRAWN_SAMPLES - 2}..{B - 2}"  # B > MAX_DRAWN_SAMPLES: two or more samples
            ax.text(x0 + block / 2, 0.5, f"...\n{hidden}\nnot drawn\n...", ha="center", va="center", fontsize=10)
            continue
        color = _color(b)
        labels = [f"$\\tilde{{\\Theta}}_{{{b}}}$" + (f" #{i}" if g > 1 else "") for i in range(g)]
        # 12 points: the subscript b, drawn at 70%, is the figure's smallest text at 8.4 points.
        _wire_groups(ax, C, O, g, [color] * g, x0, block, labels, fontsize=12)
        ax.text(x0 + block / 2, 1.22, f"sample b={b}", ha="center", va="center", fontsize=10, color=color)
        ax.text(x0 + block / 2, -0.22, f"out[{b}]", ha="center", va="center", fontsize=10, color=color)
    ax.set_title(f"groups = B*g = {B * g}: sample b meets only its own kernel;\n"
                 f"the output [1, B*O, H', W'] is viewed back to [B={B}, O={O}, H', W']", fontsize=10)
    return _finish(fig, ax, width, f"x.reshape(1, B*C={B * C}, H, W)", f"[1, B*O={B * O}, H', W']")


# -- the fused kernel's implicit GEMM ------------------------------------------------------------------


def _matrix(ax: Axes, x0: float, y0: float, rows: int, cols: int, color: str, gid: str) -> None:
    """A matrix of ``rows x cols`` unit cells with its top left corner at ``(x0, y0)`` (y grows downwards)."""
    ax.add_patch(Rectangle((x0, y0), cols, rows, facecolor=color, edgecolor="#57606a", lw=1, gid=gid))


def _tile(ax: Axes, x0: float, y0: float, rows: slice, cols: slice, color: str, gid: str, alpha: float = 1.0) -> None:
    """Highlight the cells ``[rows, cols]`` of a matrix whose top left corner is at ``(x0, y0)``."""
    ax.add_patch(Rectangle((x0 + cols.start, y0 + rows.start), cols.stop - cols.start, rows.stop - rows.start,
                           facecolor=color, edgecolor="#1f2328", lw=0.8, alpha=alpha, gid=gid))


def draw_implicit_gemm(
    x: Tensor, bank: Tensor, pi: Tensor, sample: int = 0, padding: int = 0,
    block: Tuple[int, int, int] = (16, 4, 4), tile: Tuple[int, int] = (1, 0), step: int = 4,
) -> Figure:
    """The fused forward kernel's view of dynamic convolution for sample ``b = sample``: the matrix product
    ``out_b = A_b @ mixed_b``, one program's output tile, and one step of its reduction loop.

    ``A_b`` ``[H'W', kH*kW*C]`` is the im2col matrix of ``x[b]`` (rows: output pixels; columns
    ``r = (kh, kw, c)``: one tap and one input channel, channels fastest), ``mixed_b``
    ``[kH*kW*C, O]`` the mixed kernel ``sum_j pi[b, j] Theta_j`` in the same row order, and
    ``out_b`` ``[H'W', O]``. ``block = (BLOCK_M, BLOCK_N, BLOCK_K)`` are the tile sizes; the
    program drawn owns output tile ``tile = (row tile, column tile)``, and ``step`` is the
    index of its reduction chunk (tap ``step // ceil(C / BLOCK_K)``, ``BLOCK_K`` channels).
    In that step it loads the ``A`` tile straight from ``x`` and the ``K`` bank tiles, mixes
    them with ``pi[b]`` into the ``mixed_b`` tile and adds their product to its output tile.
    Every shape written is that of a real tensor or slice computed here; the tiles at the
    edges are clipped to the matrix, as the kernel's masks clip them.

    Args:
        x: input ``[B, C, H, W]``; bank: ``[K, O, C, kH, kW]`` (one group, ``g = 1``);
        pi: attention ``[B, K]``; padding: zero padding (stride 1).

    Raises:
        ValueError: for a bank with groups, a sample, tile or step outside the problem, or a block size < 1.
    """
    B, C, H, W = x.shape
    K, O, CG, kH, kW = bank.shape
    if CG != C:
        raise ValueError(f"draws one group (g = 1): bank {tuple(bank.shape)} must have C/g = C = {C}")
    if not 0 <= sample < B:
        raise ValueError(f"sample must be in [0, {B}), got {sample}")
    if min(block) < 1:
        raise ValueError(f"block sizes must be >= 1, got {block}")
    bm, bn, bk = block
    # A_b from F.unfold, reordered from its columns (c, kh, kw) to the kernel's (kh, kw, c).
    columns = F.unfold(x[sample : sample + 1], (kH, kW), padding=padding)[0]  # [C*kH*kW, H'W']
    A = columns.reshape(C, kH * kW, -1).permute(2, 1, 0).reshape(-1, kH * kW * C)
    bank_rows = bank.permute(0, 3, 4, 2, 1).reshape(K, kH * kW * C, O)  # the K kernels in A's column order r
    Wb = torch.einsum("j,j...->...", pi[sample], bank_rows)  # sum_j pi[b, j] Theta_j, rows r
    out = A @ Wb
    P, R = A.shape
    c_chunks = -(-C // bk)
    m_tiles, n_tiles, steps = -(-P // bm), -(-O // bn), kH * kW * c_chunks
    if not (0 <= tile[0] < m_tiles and 0 <= tile[1] < n_tiles):
        raise ValueError(f"tile must be in [0, {m_tiles}) x [0, {n_tiles}) for block {block}, got {tile}")
    if not 0 <= step < steps:
        raise ValueError(f"step must be in [0, {steps}) ({kH * kW} taps x {c_chunks} channel chunks), got {step}")
    rows = slice(tile[0] * bm, min(tile[0] * bm + bm, P))
    cols = slice(tile[1] * bn, min(tile[1] * bn + bn, O))
    tap, c0 = divmod(step, c_chunks)
    red = slice(tap * C + c0 * bk, tap * C + min(c0 * bk + bk, C))
    a_tile, w_tile, out_tile, bank_tiles = A[rows, red], Wb[red, cols], out[rows, cols], bank_rows[:, red, cols]

    gap = 4.0
    left, top = 0.0, 0.0  # A's left edge; W's top edge
    x_w, y_a = R + gap, R + gap  # W and out start right of A; A and out start below W
    right, bottom = x_w + O + 20.0, y_a + P + 7.0  # the drawing's extent, in cells
    fig, ax = plt.subplots(figsize=(0.075 * right + 0.3, 0.075 * (bottom + 2.0) + 0.9))
    _matrix(ax, left, y_a, P, R, "#f6f8fa", "A")
    _matrix(ax, x_w, top, R, O, "#fff8c5", "W")
    _matrix(ax, x_w, y_a, P, O, "#effaf1", "out")
    # Tap boundaries: every C columns of A and rows of W one kernel tap ends.
    for t in range(1, kH * kW):
        ax.plot([left + t * C] * 2, [y_a, y_a + P], color="#8c959f", lw=0.5)
        ax.plot([x_w, x_w + O], [top + t * C] * 2, color="#8c959f", lw=0.5)
    # The program's row strip of A, column strip of W, output tile; then this step's chunks.
    _tile(ax, left, y_a, rows, slice(0, R), "#ddf4ff", "A rows", 0.9)
    _tile(ax, x_w, top, slice(0, R), cols, "#ffe9a8", "W columns", 0.9)
    _tile(ax, x_w, y_a, rows, cols, "#4ac26b", "out tile")
    _tile(ax, left, y_a, rows, red, "#0969da", "A tile")
    _tile(ax, x_w, top, red, cols, "#d4a72c", "W tile")

    # The K bank tiles, in the empty corner above A, level with the W tile they are mixed into.
    tile_w, tile_h = cols.stop - cols.start, red.stop - red.start
    spacing = (R - 1.0) / K
    size = min(3.0, 0.7 * spacing / tile_w, 0.5 * R / tile_h)  # drawn cell size: the K tiles fit above A
    y_bank = max(2.0, min(top + red.start + tile_h / 2 - size * tile_h / 2, R - size * tile_h - 5.0))
    xs = [1.0 + j * spacing for j in range(K)]
    for j, xj in enumerate(xs):
        ax.add_patch(Rectangle((xj, y_bank), size * tile_w, size * tile_h, facecolor="#ffe9a8",
                               edgecolor="#1f2328", lw=0.8, gid="bank tile"))
        ax.text(xj + size * tile_w / 2, y_bank - 0.6, f"$\\pi_{{b,{j}}}\\,\\Theta_{{{j}}}$", ha="center",
                va="bottom", fontsize=9)
    ax.text(1.0, y_bank + size * tile_h + 1.0,
            f"bank tiles {shape_text(tuple(bank_tiles.shape))}\nmixed in registers:\n"
            f"$\\Sigma_j\\,\\pi_{{b,j}}\\,\\Theta_j$: K = {K} FMAs\nper weight", va="top", fontsize=9.5, gid="bank")
    _arrow(ax, (xs[-1] + size * tile_w + 0.3, y_bank + size * tile_h / 2), (x_w - 0.3, top + red.start + tile_h / 2))

    ax.text(left, y_a + P + 1.5, f"$A_b$ = im2col(x[b]) {shape_text(tuple(A.shape))}, never built:\n"
            f"A tile {shape_text(tuple(a_tile.shape))} loaded from x", va="top", fontsize=10.5, gid="A")
    ax.text(x_w + O + 1.0, top + R / 2,
            f"$\\tilde\\Theta_b$ = $\\Sigma_j\\,\\pi_{{b,j}}\\,\\Theta_j$\n{shape_text(tuple(Wb.shape))}\n"
            f"$\\tilde\\Theta_b$ tile {shape_text(tuple(w_tile.shape))}\nnever stored", va="center",
            fontsize=10.5, gid="W")
    ax.text(x_w + O + 1.0, y_a + P / 2, f"out_b {shape_text(tuple(out.shape))}\n"
            f"output tile\n{shape_text(tuple(out_tile.shape))}\n+= A tile\n   @ $\\tilde\\Theta_b$ tile",
            va="center", fontsize=10.5, gid="out")
    ax.text(left, y_a - 1.0, f"rows: output pixels p = (oh, ow)\ncolumns: r = (kh, kw, c), "
            f"{kH * kW} taps", va="bottom", fontsize=9.5)
    ax.set_title(f"out_b = $A_b$ @ $\\tilde\\Theta_b$ for sample b = {sample}\nprogram ({tile[0]}, {tile[1]}), "
                 f"reduction step {step} (steps 0 to {steps - 1}): tap {tap}", fontsize=11)
    ax.set_xlim(-0.5, right)
    ax.set_ylim(bottom, -1.5)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.tight_layout()
    return _close(fig)


# -- the family of chapter 11 ------------------------------------------------------------------------


def draw_family_parameters(layers: Dict[str, torch.nn.Module]) -> Figure:
    """One horizontal bar per layer of ``layers`` (by variant name, top to bottom): its parameters in
    thousands, split by :func:`dyconv_teach.teaching.family.parameter_parts` into the kernels, DCD's
    latent path and the router, with the total written at the bar's end."""
    from .family import parameter_parts  # the layers' own parameters, counted

    names = list(layers)
    parts = {name: parameter_parts(layer) for name, layer in layers.items()}  # type: ignore[arg-type]
    fig, ax = plt.subplots(figsize=(5.4, 0.62 * len(names) + 1.5))
    colors = {"kernels": _color(0), "P and Q": _color(2), "router": _color(1)}
    most = max(sum(p.values()) for p in parts.values()) / 1000
    for row, name in enumerate(names):
        left = 0.0
        for part, color in colors.items():
            width = parts[name][part] / 1000
            ax.barh(row, width, left=left, color=color, label=part if row == 0 else None, height=0.6)
            left += width
        ax.text(left + 0.02 * most, row, f"{left:.1f}k", va="center", ha="left", fontsize=12)
    ax.set_yticks(range(len(names)), names, fontsize=12)
    ax.invert_yaxis()
    ax.set_xlim(0, most * 1.3)
    ax.set_xlabel("parameters (thousands)", fontsize=12)
    ax.tick_params(axis="x", labelsize=11)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=11, loc="lower right", frameon=False)
    fig.tight_layout()
    return _close(fig)
