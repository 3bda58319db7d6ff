"""dyconv_teach.teaching.plots: every labelled shape is a real tensor's, and the diagrams wire what convolution
connects."""

from __future__ import annotations

import io
import re
from typing import Dict, List, Tuple

import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from dyconv_teach import DynamicConv2d
from dyconv_teach.reference import per_sample_conv
from dyconv_teach.teaching.plots import (
    MAX_DRAWN_SAMPLES,
    draw_batch_as_groups,
    draw_channel_layouts,
    draw_dynamic_convolution,
    draw_gradient_flow,
    draw_group_wiring,
    draw_implicit_gemm,
    drawn_shapes,
)
from dyconv_teach.teaching.shapes import EXAMPLE, batch_kernel_shapes

SHAPE = re.compile(r"\[(\d+(?:, \d+)*)\]")
Labels = List[Tuple[str, Tuple[int, ...]]]


def labelled_shapes(fig: Figure) -> Labels:
    """``drawn_shapes(fig)``, after checking that it found every numeric shape written in the figure
    (in any text artist, titles included) and that each has a name."""
    written = [match for text in fig.findobj(lambda artist: hasattr(artist, "get_text"))
               for match in SHAPE.finditer(text.get_text().replace("\u00a0", " "))]
    found = drawn_shapes(fig)
    assert len(found) == len(written) and all(name is not None for name, _ in found), found
    return [(str(name), shape) for name, shape in found]


def assert_closed(fig: Figure) -> None:
    assert not plt.fignum_exists(fig.number), "the figure must be closed in pyplot (shown once per cell)"


# -- dynamic convolution ---------------------------------------------------------------------------


def attention_branch(layer: DynamicConv2d, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention branch of a real forward pass written out: pooled x, fc1's output, the logits."""
    pooled = x.mean(dim=(2, 3))
    hidden = layer.fc1(pooled)
    return pooled, hidden, layer.fc2(F.relu(hidden))


@pytest.mark.parametrize("B, C, O, K, k, g, H, routing", [
    (EXAMPLE.B, EXAMPLE.C, EXAMPLE.O, EXAMPLE.K, EXAMPLE.k, 1, EXAMPLE.H, "softmax"),
    (3, 16, 4, 2, 5, 2, 7, "sigmoid"),
    (1, 8, 12, 7, 1, 4, 5, "softmax"),
])
def test_dynamic_convolution_labels_real_shapes(B: int, C: int, O: int, K: int, k: int, g: int, H: int,
                                                routing: str) -> None:
    torch.manual_seed(0)
    layer = DynamicConv2d(C, O, k, groups=g, num_kernels=K, routing=routing)
    x = torch.randn(B, C, H, H)
    fig = draw_dynamic_convolution(layer, x)
    assert_closed(fig)
    # The shapes of a real forward pass, step by step.
    with torch.no_grad():
        pooled, hidden, logits = attention_branch(layer, x)
        pi = layer.attention(x)
        y = layer(x)
        bank = layer.weight.reshape(K, O, C // g, k, k)
        # The drawn bank and per-sample kernels are what the layer computes with: the slow reference
        # with this bank reproduces the layer's output.
        assert torch.allclose(per_sample_conv(x, bank, pi, layer.bias, groups=g), y, atol=1e-5)
        mixed = torch.einsum("bj,j...->b...", pi, bank)
    expected: Labels = [
        ("x", tuple(x.shape)), ("avgpool", tuple(pooled.shape)), ("fc1", tuple(hidden.shape)),
        ("relu", tuple(hidden.shape)), ("logits", tuple(logits.shape)), ("pi", tuple(pi.shape)),
        ("bank", tuple(bank.shape)), ("kernel", tuple(bank.shape[1:])), ("mix", tuple(mixed.shape)),
        ("y", tuple(y.shape)),
    ]
    assert sorted(labelled_shapes(fig)) == sorted(expected)
    assert (pi.shape, mixed.shape, y.shape) == ((B, K), (B, O, C // g, k, k), (B, O, H - k + 1, H - k + 1))
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any(t.startswith(f"$\\pi$ = {routing}(logits / $\\tau$)") for t in texts)
    # The output box reads as the text writes it: y_b = Theta~_b * x_b + beta~_b.
    assert any(t.startswith("y: $\\tilde\\Theta_b * x_b + \\tilde\\beta_b$") for t in texts)
    thetas = sorted(t for t in texts if t.startswith("$\\Theta_{"))
    assert thetas == sorted(f"$\\Theta_{{{j}}}$" for j in (range(K) if K <= 5 else (0, 1, 2, K - 1)))


@pytest.mark.parametrize("B, C, O, K, k, g, H, bias", [
    (EXAMPLE.B, EXAMPLE.C, EXAMPLE.O, EXAMPLE.K, EXAMPLE.k, 1, EXAMPLE.H, True),
    (3, 16, 4, 2, 5, 2, 7, False),
])
def test_gradient_flow_labels_real_shapes(B: int, C: int, O: int, K: int, k: int, g: int, H: int,
                                          bias: bool) -> None:
    torch.manual_seed(0)
    layer = DynamicConv2d(C, O, k, groups=g, num_kernels=K, bias=bias, temperature=2.0)
    x = torch.randn(B, C, H, H)
    fig = draw_gradient_flow(layer, x)
    assert_closed(fig)
    # The tensors of a real forward pass, the branch written out as the figure draws it (each gradient
    # has its tensor's shape).
    with torch.no_grad():
        pooled, hidden, logits = attention_branch(layer, x)
        pi = torch.softmax(logits / layer.temperature, dim=-1)
        assert torch.allclose(pi, layer.attention(x))
        mixed = torch.einsum("bj,j...->b...", pi, layer.bank)
        y = layer(x)
    expected: Labels = [
        ("x", tuple(x.shape)), ("avgpool", tuple(pooled.shape)), ("fc1", tuple(hidden.shape)),
        ("relu", tuple(hidden.shape)), ("logits", tuple(logits.shape)), ("pi", tuple(pi.shape)),
        ("bank", tuple(layer.bank.shape)), ("mix", tuple(mixed.shape)), ("y", tuple(y.shape)),
    ]
    if bias:  # the bank's biases [K, O] and the mixed ones [B, O]
        expected += [("bank", (K, O)), ("mix", (B, O))]
    assert sorted(labelled_shapes(fig)) == sorted(expected)
    texts = " ".join(t.get_text() for t in fig.axes[0].texts)
    # The rules of the steps the chapter checks against autograd, the temperature's among them.
    rules = ["(\\mathrm{diag}\\, \\pi_b - \\pi_b \\pi_b^\\top) / \\tau",
             "\\Sigma_b\\, \\pi_{b,j}\\, \\nabla\\tilde\\Theta_b",
             "\\langle\\nabla\\tilde\\Theta_b, \\Theta_j\\rangle", "transposed conv", "$1 / (HW)$"]
    assert all(rule in texts for rule in rules)
    assert ("\\beta" in texts) == bias  # the biases' rules only where the layer has biases
    # fc1's and fc2's biases are gamma and delta: u, v are the offsets inside a kernel's window (chapter 2).
    assert "($U$, $\\gamma$)" in texts and "($V$, $\\delta$)" in texts
    assert "$u$" not in texts and "$v$" not in texts


def test_gradient_flow_draws_softmax_routing_only() -> None:
    with pytest.raises(ValueError, match="draws the softmax routing"):
        draw_gradient_flow(DynamicConv2d(4, 6, 3, routing="sigmoid"), torch.randn(2, 4, 9, 9))


# -- channel layouts -------------------------------------------------------------------------------


def cells(fig: Figure) -> Dict[Tuple[float, float], Tuple[str, int]]:
    """(x, y) of each labelled cell -> (its label, the sample its colour stands for)."""
    tab10 = [to_rgba(plt.get_cmap("tab10")(b), 0.55) for b in range(10)]
    ax = fig.axes[0]
    rects = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_width() == 1]
    found = {}
    for text in ax.texts:
        if not re.fullmatch(r"c\d+|\d+,\d+", text.get_text()):
            continue  # a title or the sentence, not a cell
        x, y = text.get_position()
        [rect] = [r for r in rects if r.get_x() < x < r.get_x() + 1 and r.get_y() < y < r.get_y() + 1]
        found[(x, y)] = (text.get_text(), tab10.index(to_rgba(rect.get_facecolor())))
    return found


def grid(found: Dict[Tuple[float, float], Tuple[str, int]], x_from: float, x_to: float,
         y_below: float) -> List[List[Tuple[str, int]]]:
    """The cells with x in [x_from, x_to) and y < y_below, as rows top to bottom."""
    inside = {p: v for p, v in found.items() if x_from <= p[0] < x_to and p[1] < y_below}
    ys = sorted({p[1] for p in inside}, reverse=True)
    return [[v for p, v in sorted(inside.items()) if p[1] == y] for y in ys]


@pytest.mark.parametrize("B, C, O, g", [(EXAMPLE.B, EXAMPLE.C, EXAMPLE.O, 1), (EXAMPLE.B, EXAMPLE.C, EXAMPLE.O, 2),
                                        (3, 4, 4, 1), (1, 4, 6, 2)])
def test_channel_layouts_show_real_reshapes(B: int, C: int, O: int, g: int) -> None:
    k, H = EXAMPLE.k, EXAMPLE.H
    fig = draw_channel_layouts(B, C, O, g, k, H)
    assert_closed(fig)
    # The shapes of the real calls: the blog code's F.conv2d and the batch-as-groups one.
    r = batch_kernel_shapes(B, 2, C, O, g, k, H)
    expected = [("x", r.trick_call.input), ("blog", r.blog_call.weight), ("correct", r.trick_call.weight)]
    if B > 1:  # the sentence explaining the blog's error names its weight and, for a channel mismatch, x
        expected.append(("why", r.blog_call.weight))
        if "channels" in (r.blog_error or ""):
            expected.append(("why", r.blog_call.input))
    assert sorted(labelled_shapes(fig)) == sorted(expected)
    # Every cell's sample (its colour) and label are where a C-order reshape puts them.
    found = cells(fig)
    c_g = C // g
    [x_row] = grid(found, 0, B * C, float("inf"))[:1]
    assert x_row == [(f"c{i % C}", i // C) for i in range(B * C)]
    top = min(y for (_, y), (label, _) in found.items() if label.startswith("c")) - 1
    for layout, (rows, cols), x0 in [("blog", (O, B * c_g), 0.0), ("correct", (B * O, c_g), B * c_g + 2.5)]:
        drawn = grid(found, x0, x0 + cols, top)
        assert len(drawn) == rows and all(len(row) == cols for row in drawn), layout
        for r_, row in enumerate(drawn):
            for q, (label, sample) in enumerate(row):
                flat = r_ * cols + q  # the kernel slice's index in [B, O, C/g] order
                assert (label, sample) == (f"{flat % (O * c_g) // c_g},{flat % c_g}", flat // (O * c_g)), layout


def test_channel_layouts_reject_bad_groups() -> None:
    with pytest.raises(ValueError, match="g=4 must divide C=6"):
        draw_channel_layouts(2, 6, 4, 4)


# -- wiring diagrams -------------------------------------------------------------------------------


@pytest.mark.parametrize("C, O, g", [(4, 6, 1), (4, 6, 2), (8, 8, 4), (6, 3, 3)])
def test_group_wiring_lines(C: int, O: int, g: int) -> None:
    fig = draw_group_wiring(C, O, g)
    ax = fig.axes[0]
    # One line per (input channel, kernel) pair inside a group: g * (C/g) * (O/g).
    assert len(ax.lines) == C * O // g
    # Lines of different groups have different colors, one color per group.
    assert len({to_rgba(line.get_color()) for line in ax.lines}) == g
    assert_closed(fig)


@pytest.mark.parametrize("B, C, O, g", [(1, 4, 4, 1), (3, 4, 4, 1), (2, 4, 6, 2), (4, 4, 6, 1), (8, 4, 6, 2)])
def test_batch_as_groups_lines(B: int, C: int, O: int, g: int) -> None:
    fig = draw_batch_as_groups(B, C, O, g)
    ax = fig.axes[0]
    assert_closed(fig)
    # A large batch draws its first samples and its last; the others are an ellipsis.
    drawn = list(range(B)) if B <= MAX_DRAWN_SAMPLES else [*range(MAX_DRAWN_SAMPLES - 2), B - 1]
    assert len(ax.lines) == len(drawn) * C * O // g  # g groups of (C/g) x (O/g) wires per drawn sample
    assert len({to_rgba(line.get_color()) for line in ax.lines}) == len(drawn)  # one color per sample
    texts = [t.get_text() for t in ax.texts]
    assert [t for t in texts if t.startswith("sample b=")] == [f"sample b={b}" for b in drawn]
    assert f"x.reshape(1, B*C={B * C}, H, W)" in texts and f"[1, B*O={B * O}, H', W']" in texts
    assert (B > MAX_DRAWN_SAMPLES) == any("not drawn" in t for t in texts)
    if B > MAX_DRAWN_SAMPLES:
        assert any(f"b = {MAX_DRAWN_SAMPLES - 2}..{B - 2}" in t for t in texts)


@pytest.mark.parametrize("g", [1, 2])
def test_batch_as_groups_text_is_never_small(g: int) -> None:
    # The chapter's explorer shows this diagram for B up to 8 (four samples drawn): no text,
    # subscripts included, under 8 points (a 1280 px page shows the widest at 1 px per point).
    for B in range(1, 9):
        svg = io.StringIO()
        with plt.rc_context({"svg.fonttype": "none"}):
            draw_batch_as_groups(B, EXAMPLE.C, EXAMPLE.O, g).savefig(svg, format="svg", bbox_inches="tight")
        sizes = [float(size) for size in re.findall(r"font-size: ([0-9.]+)px", svg.getvalue())]
        assert sizes and min(sizes) >= 8, (B, g, sorted(set(sizes)))


@pytest.mark.parametrize("draw, args, message", [
    (draw_group_wiring, (6, 4, 4), "g=4 must divide C=6"),
    (draw_group_wiring, (4, 6, 4), "g=4 must divide O=6"),
    (draw_batch_as_groups, (0, 4, 4, 1), "B must be >= 1, got 0"),
])
def test_bad_arguments(draw, args, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        draw(*args)


# -- the fused kernel's implicit GEMM ----------------------------------------------------------------


def patch(fig: Figure, gid: str) -> Rectangle:
    [found] = [p for p in fig.axes[0].patches if p.get_gid() == gid]
    return found


@pytest.mark.parametrize("B, C, O, K, k, H, padding, block, tile, step", [
    (EXAMPLE.B, EXAMPLE.C, EXAMPLE.O, EXAMPLE.K, EXAMPLE.k, EXAMPLE.H, 0, (16, 4, 4), (1, 0), 4),
    # Two channel chunks per tap, and the last row and column tiles, clipped by the matrix edges.
    (3, 6, 5, 2, 3, 6, 1, (32, 4, 4), (1, 1), 5),
])
def test_implicit_gemm_draws_the_real_product(B: int, C: int, O: int, K: int, k: int, H: int, padding: int,
                                              block: Tuple[int, int, int], tile: Tuple[int, int], step: int) -> None:
    torch.manual_seed(0)
    x, bank, pi = torch.randn(B, C, H, H), torch.randn(K, O, C, k, k), torch.randn(B, K).softmax(-1)
    b = B - 1
    fig = draw_implicit_gemm(x, bank, pi, sample=b, padding=padding, block=block, tile=tile, step=step)
    assert_closed(fig)
    # A_b by its definition, A_b[(oh, ow), (kh, kw, c)] = x_padded[b, c, oh + kh, ow + kw], times the mixed
    # kernel in the same row order, is sample b's convolution with its kernel.
    mixed = torch.einsum("j,j...->...", pi[b], bank)
    y = F.conv2d(x[b : b + 1], mixed, padding=padding)[0]  # [O, H', W']
    xp = F.pad(x[b], (padding,) * 4)
    A = torch.stack([torch.cat([xp[:, oh + kh, ow + kw] for kh in range(k) for kw in range(k)])
                     for oh in range(y.shape[1]) for ow in range(y.shape[2])])
    W = mixed.permute(2, 3, 1, 0).reshape(k * k * C, O)
    out = y.reshape(O, -1).t()
    torch.testing.assert_close(A @ W, out, rtol=1e-5, atol=1e-5)
    # The program's tiles: rows of its output tile, columns of this step's chunk (one tap, BLOCK_K channels).
    bm, bn, bk = block
    chunks = -(-C // bk)
    tap, c0 = divmod(step, chunks)
    rows = slice(tile[0] * bm, min(tile[0] * bm + bm, out.shape[0]))
    cols = slice(tile[1] * bn, min(tile[1] * bn + bn, O))
    red = slice(tap * C + c0 * bk, tap * C + min(c0 * bk + bk, C))
    bank_tiles = bank.permute(0, 3, 4, 2, 1).reshape(K, k * k * C, O)[:, red, cols]
    # The mix of the K tiles (equal to the last bits: einsum may sum a slice in another order).
    torch.testing.assert_close(torch.einsum("j,j...->...", pi[b], bank_tiles), W[red, cols], rtol=1e-6, atol=1e-6)
    expected: Labels = [("A", tuple(A.shape)), ("A", tuple(A[rows, red].shape)),
                        ("W", tuple(W.shape)), ("W", tuple(W[red, cols].shape)),
                        ("out", tuple(out.shape)), ("out", tuple(out[rows, cols].shape)),
                        ("bank", tuple(bank_tiles.shape))]
    assert sorted(labelled_shapes(fig)) == sorted(expected)
    # Each highlighted tile covers exactly its cells of the matrix it belongs to.
    for matrix, gid, (r, c) in [("A", "A tile", (rows, red)), ("W", "W tile", (red, cols)),
                                ("out", "out tile", (rows, cols))]:
        m, t = patch(fig, matrix), patch(fig, gid)
        assert (t.get_x() - m.get_x(), t.get_y() - m.get_y()) == (c.start, r.start), gid
        assert (t.get_width(), t.get_height()) == (c.stop - c.start, r.stop - r.start), gid
    assert (patch(fig, "A").get_height(), patch(fig, "A").get_width()) == tuple(A.shape)
    assert len([p for p in fig.axes[0].patches if p.get_gid() == "bank tile"]) == K


@pytest.mark.parametrize("change, message", [
    ({"bank": (5, 6, 2, 3, 3)}, r"draws one group \(g = 1\): bank \(5, 6, 2, 3, 3\) must have C/g = C = 4"),
    ({"tile": (4, 0)}, r"tile must be in \[0, 4\) x \[0, 2\)"),
    ({"step": 9}, r"step must be in \[0, 9\) \(9 taps x 1 channel chunks\), got 9"),
    ({"sample": 2}, r"sample must be in \[0, 2\), got 2"),
])
def test_implicit_gemm_rejects_bad_arguments(change: Dict[str, object], message: str) -> None:
    x, pi = torch.randn(2, 4, 9, 9), torch.randn(2, 5)
    bank = torch.randn(*change.pop("bank", (5, 6, 4, 3, 3)))  # type: ignore[misc]
    with pytest.raises(ValueError, match=message):
        draw_implicit_gemm(x, bank, pi, **change)  # type: ignore[arg-type]


def test_family_parameters_draws_the_counted_parameters() -> None:
    from dyconv_teach.teaching.family import VARIANTS, build_layer, parameter_parts
    from dyconv_teach.teaching.plots import draw_family_parameters

    layers = {v: build_layer(v, 16, 8, 3, 3) for v in VARIANTS}
    fig = draw_family_parameters(layers)
    ax = fig.axes[0]
    widths = [round(p.get_width() * 1000) for p in ax.patches]  # variant by variant, part by part
    assert widths == [parameter_parts(layers[v])[part] for v in VARIANTS for part in ("kernels", "P and Q", "router")]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(VARIANTS)
