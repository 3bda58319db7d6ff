"""The book's four explorers, built on :mod:`dyconv_teach.teaching.explorer`.

- :func:`static_conv_explorer` (chapter 2): the shapes of one ``F.conv2d`` call.
- :func:`grouped_conv_explorer` (chapter 3): grouped convolution and its wiring.
- :func:`batch_kernel_explorer` (chapter 5): batching a dynamic convolution, from
  the mix of the K kernels to the batch-as-groups call.
- :func:`family_explorer` (chapter 11): CondConv, DyConv, ODConv and DCD, each its own mixing
  step (:mod:`dyconv_teach.teaching.family`) before one and the same batching step.

Each render function takes one setting of the explorer's controls, runs the real
torch calls of :mod:`dyconv_teach.teaching.shapes` and returns HTML fragments; every error
it shows comes with the sentence of :mod:`dyconv_teach.teaching.explain` that explains it.
Every setting the live sliders reach is checked the same way as the static grid.
"""

from __future__ import annotations

from typing import Optional

from .explain import BLOG_VIEW, NAIVE_5D, Symbols, conv2d_problem, groups_problem
from .explorer import Control, Explorer, Fragments, caption, error, formula, note, ok, svg_image, table
from .family import VARIANTS, family_shapes
from .plots import draw_batch_as_groups, draw_group_wiring
from .shapes import (
    EXAMPLE,
    OUTPUT_SIZE_FORMULA,
    batch_kernel_shapes,
    grouped_conv_shapes,
    shape_text,
    static_conv_shapes,
)

__all__ = ["static_conv_explorer", "grouped_conv_explorer", "batch_kernel_explorer", "family_explorer"]


def _explained(why: Optional[str], message: str) -> str:
    """The sentence for an error torch raised; no sentence means the explanation and torch disagree."""
    if why is None:
        raise AssertionError(f"torch raised {message!r} where dyconv_teach.teaching.explain finds nothing wrong")
    return why


# -- chapter 2: static convolution ---------------------------------------------------------------

_STATIC_AXES = Symbols(("B", "C", "H", "W"), ("O", "C", "k", "k"), "1")


def _render_static(C: int, O: int, k: int, stride: int, padding: int, dilation: int, H: int) -> Fragments:
    r = static_conv_shapes(C, O, k, stride, padding, dilation, H)
    rows = [("input x", "[B, C, H, W]", shape_text(r.input)), ("weight", "[O, C, k, k]", shape_text(r.weight))]
    if r.error is None:
        rows.append(("output", "[B, O, H', W']", shape_text(r.output)))
        shapes = table(rows)
    else:
        why = conv2d_problem(r.input, r.weight, 1, _STATIC_AXES, padding, dilation)
        shapes = table(rows) + error("F.conv2d", "RuntimeError", r.error, _explained(why, r.error))
    return {"shapes": shapes, "formula": formula(OUTPUT_SIZE_FORMULA, r.formula)}


def static_conv_explorer() -> Explorer:
    """Explore ``F.conv2d``'s shapes: C, O, k, stride, padding, dilation, H (W = H, B = 1)."""
    controls = [
        Control("C", "C", (1, EXAMPLE.C, 8), EXAMPLE.C, tuple(range(1, 17))),
        Control("O", "O", (EXAMPLE.O, 16), EXAMPLE.O, tuple(range(1, 33))),
        Control("k", "k", (1, 3, 5, 7), EXAMPLE.k, tuple(range(1, 12))),
        Control("stride", "stride", (1, 2, 3), 1, tuple(range(1, 5))),
        Control("padding", "padding", (0, 1, 2, 3), 0, tuple(range(0, 6))),
        Control("dilation", "dilation", (1, 2), 1, tuple(range(1, 5))),
        Control("H", "H = W", (5, EXAMPLE.H, 28), EXAMPLE.H, tuple(range(1, 65))),
    ]
    headers = {
        "shapes": caption("Shapes of one F.conv2d(x, weight, stride, padding, dilation) call, B = 1"),
        "formula": caption("Output size, as in the nn.Conv2d docstring (W' = H')"),
    }
    return Explorer("static", "Static convolution: every shape from a real F.conv2d call", controls,
                    ("shapes", "formula"), _render_static, headers)


# -- chapter 3: grouped convolution --------------------------------------------------------------


def _render_grouped(C: int, O: int, g: int) -> Fragments:
    r = grouped_conv_shapes(C, O, g)
    rows = [("input x", "[B, C, H, W]", shape_text(r.input)), ("weight", "[O, C/g, k, k]", shape_text(r.weight))]
    if r.error is not None:
        why = _explained(groups_problem(C, O, g), r.error)
        shapes = table(rows) + error("nn.Conv2d(C, O, k, groups=g)", "ValueError", r.error, why)
        return {"shapes": shapes, "split": note("no channel split to show"), "diagram": note("no wiring to draw")}
    rows.append(("output", "[B, O, H', W']", shape_text(r.output)))
    split = [f"group {i}: input channels {_span(ins)} -> output channels {_span(outs)}"
             for i, (ins, outs) in enumerate(r.split)]
    assert r.weight is not None  # no error, so the layer was built
    k = r.weight[-1]
    params = (
        f"weight parameters: O*(C/g)*k*k = {O}*{C // g}*{k}*{k} = {r.params}, "
        f"vs {r.params_dense} with g=1 (1/{g} of them)"
    )
    return {"shapes": table(rows), "split": ok(*split, params), "diagram": svg_image(draw_group_wiring, C, O, g)}


def _span(channels: range) -> str:
    """``"2..3"`` for channels 2 and 3, ``"2"`` for channel 2 alone."""
    return str(channels.start) if len(channels) == 1 else f"{channels.start}..{channels.stop - 1}"


def grouped_conv_explorer() -> Explorer:
    """Explore grouped convolution: C, O, g (k and H = W of the running example, B = 1)."""
    controls = [
        Control("C", "C", (2, 4, 6, 8), EXAMPLE.C, tuple(range(1, 17))),
        Control("O", "O", (2, 4, 6, 8), EXAMPLE.O, tuple(range(1, 17))),
        Control("g", "g", (1, 2, 3, 4), 2, tuple(range(1, 9))),
    ]
    headers = {"shapes": caption("nn.Conv2d(C, O, k, groups=g) and its F.conv2d call"),
               "split": caption("Channel split and parameters"),
               "diagram": caption("Wiring: a line joins an input channel to each filter that reads it")}
    return Explorer("grouped", "Grouped convolution: weight [O, C/g, k, k]", controls,
                    ("shapes", "split", "diagram"), _render_grouped, headers)


# -- chapter 5: batching a dynamic convolution ----------------------------------------------------

def _render_batch_kernel(B: int, K: int, g: int, C: int, O: int, k: int, H: int) -> Fragments:
    r = batch_kernel_shapes(B, K, C, O, g, k, H)
    shapes = table([
        ("x", "[B, C, H, W]", shape_text(r.x)),
        ("pi", "[B, K]", shape_text(r.attention)),
        ("bank Theta", "[K, O, C/g, k, k]", shape_text(r.bank)),
    ])
    mix = table([
        ("Theta.reshape(K, -1)", "[K, O*C/g*k*k]", shape_text(r.flat_bank)),
        ("pi @ Theta.reshape(K, -1)", "[B, O*C/g*k*k]", shape_text(r.mixed)),
        ("viewed as kernels", "[B, O, C/g, k, k]", shape_text(r.aggregated)),
    ]) + formula(
        "[B, K] @ [K, O*C/g*k*k] -> [B, O*C/g*k*k]",
        f"{shape_text(r.attention)} @ {shape_text(r.flat_bank)} -> {shape_text(r.mixed)}",
    ) + note(
        f"K (here {K}) lives only in this product: it sums over the kernels j, so sample b gets one kernel "
        f"sum_j pi[b, j] Theta_j, and after the mixing no shape holds K."
    )
    naive_why = conv2d_problem(r.x, r.aggregated, g, NAIVE_5D)
    naive = error("F.conv2d", "RuntimeError", r.naive_error, _explained(naive_why, r.naive_error))
    blog_rows = [
        ("x.view(1, -1, H, W)", "[1, B*C, H, W]", shape_text(r.blog_call.input)),
        ("mixed.view(O, -1, k, k)", "[O, B*C/g, k, k]", shape_text(r.blog_call.weight)),
        ("groups", "g*B", str(r.blog_call.groups)),
    ]
    if r.blog_error is None:
        blog_result = ok(f"works for B={B}: output {shape_text(r.blog_output)}")
    else:
        call = r.blog_call
        why = conv2d_problem(call.input, call.weight, call.groups, BLOG_VIEW)
        blog_result = error(f"the blog's F.conv2d (B={B})", "RuntimeError", r.blog_error, _explained(why, r.blog_error))
    trick = table([
        ("x.reshape(1, B*C, H, W)", "[1, B*C, H, W]", shape_text(r.trick_call.input)),
        ("weight", "[B*O, C/g, k, k]", shape_text(r.trick_call.weight)),
        ("groups", "B*g", str(r.trick_call.groups)),
        ("F.conv2d output", "[1, B*O, H', W']", shape_text(r.trick_call.output)),
        ("viewed back", "[B, O, H', W']", shape_text(r.trick_output)),
    ]) + ok(f"torch.allclose(trick, per-sample loop): {r.matches_loop}")
    return {
        "shapes": shapes,
        "mix": mix,
        "naive-error": naive,
        "blog": table(blog_rows) + blog_result,
        "trick": trick,
        "diagram": svg_image(draw_batch_as_groups, B, C, O, g),
    }


def batch_kernel_explorer(C: int = EXAMPLE.C, O: int = EXAMPLE.O, k: int = EXAMPLE.k, H: int = EXAMPLE.H) -> Explorer:
    """Explore batching dynamic convolution: B, K and g for fixed C, O, k, H (the running example's)."""
    divisors = tuple(d for d in range(1, min(C, O) + 1) if C % d == 0 and O % d == 0)
    controls = [
        Control("B", "B", (1, 2, 3, 4), EXAMPLE.B, tuple(range(1, 9))),
        Control("K", "K", (1, 2, 3, 4, 5), EXAMPLE.K, tuple(range(1, 9))),
        Control("g", "g", tuple(d for d in (1, 2) if d in divisors), 1, divisors),
    ]

    def render(B: int, K: int, g: int) -> Fragments:
        return _render_batch_kernel(B, K, g, C, O, k, H)

    headers = {
        "shapes": caption("Attention pi and the kernel bank Theta = [Theta_0, ..., Theta_(K-1)]"),
        "mix": caption("Where K lives and disappears: one matrix product mixes the kernels per sample"),
        "naive-error": caption("The naive path: F.conv2d(x, mixed, groups=g) with the 5-D weight"),
        "blog": caption("The blog post's reshape: one .view for the whole batch"),
        "trick": caption("Batch as groups: one grouped F.conv2d call"),
        "diagram": caption("Wiring of the trick: sample b meets only its own kernel"),
    }
    return Explorer("batch_kernel", f"Dynamic convolution of a batch (C={C}, O={O}, k={k}, H=W={H})", controls,
                    ("shapes", "mix", "naive-error", "blog", "trick", "diagram"), render, headers,
                    fixed={"C": C, "O": O, "k": k, "H": H})


# -- chapter 11: the family ---------------------------------------------------------------------

#: What each variant's mixing step does with K, and what its weights are.
_FAMILY_NOTES = {
    "CondConv": "One linear layer and a sigmoid per kernel: each gate lies between 0 and 1 on its own, so the "
                "gates of a sample need not sum to 1 (here, per sample: {sums}).",
    "DyConv": "A softmax over the K = {K} kernels, its logits divided by tau: each sample's weights sum to "
              "{sums}.",
    "ODConv": "Four attentions from one router. The input and output channel attentions could act on x and "
              "y instead of the kernel, at one multiplication per activation, as the official code does; the "
              "spatial attention cannot; the kernel attention could only as the K-branch sum, at K times the "
              "convolutions.{k1}",
    "DCD": "K = {K} plays no role: DCD has no bank of K kernels. It keeps one static kernel Theta_s and fuses "
           "channels in a latent space of L = floor(sqrt(4*C)) = {L} dimensions. P Phi Q^T is a 1 x 1 kernel: "
           "it is added at the centre tap of each k x k kernel.",
}


def _render_family(variant: int, B: int, K: int, C: int, O: int, k: int, H: int) -> Fragments:
    name = VARIANTS[variant]
    r = family_shapes(name, B, K, C, O, k, H)
    rows = [("x", "[B, C, H, W]", shape_text(r.x))]
    rows += [(s.what, s.symbols, shape_text(s.shape) if s.shape is not None else "none") for s in r.steps]
    sums = "" if r.attention_sums is None else ", ".join(f"{s:.3f}" for s in r.attention_sums)
    left_out = " With K = 1 the kernel attention is left out." if K == 1 else ""
    mixing = table(rows) + note(_FAMILY_NOTES[name].format(K=K, L=r.latent, sums=sums, k1=left_out))
    call = r.batch_call
    batching = table([
        ("x.reshape(1, B*C, H, W)", "[1, B*C, H, W]", shape_text(call.input)),
        ("weight", "[B*O, C/g, k, k]", shape_text(call.weight)),
        ("groups", "B*g", str(call.groups)),
        ("F.conv2d output", "[1, B*O, H', W']", shape_text(call.output)),
        ("viewed back", "[B, O, H', W']", shape_text(r.output)),
    ]) + ok(f"batched == per-sample loop: {r.matches_loop}", f"batched == the layer's own forward: {r.matches_layer}")
    return {"mixing": mixing, "batching": batching}


def family_explorer(C: int = EXAMPLE.C, O: int = EXAMPLE.O, k: int = EXAMPLE.k, H: int = EXAMPLE.H) -> Explorer:
    """Explore the family: the variant, B and K, for fixed C, O, k and H (padding k // 2, g = 1)."""
    controls = [
        Control("variant", "variant", tuple(range(len(VARIANTS))), 0, tuple(range(len(VARIANTS))), VARIANTS),
        Control("B", "B", (1, 2, 3), EXAMPLE.B, tuple(range(1, 9))),
        Control("K", "K", (1, 2, 4, 5), EXAMPLE.K, tuple(range(1, 9))),
    ]

    def render(variant: int, B: int, K: int) -> Fragments:
        return _render_family(variant, B, K, C, O, k, H)

    headers = {
        "mixing": caption("The mixing step: each variant builds every sample's kernel its own way"),
        "batching": caption("The batching step: the same grouped F.conv2d call for every variant"),
    }
    return Explorer("family", f"The family on one batch (C={C}, O={O}, k={k}, H=W={H}, padding {k // 2})",
                    controls, ("mixing", "batching"), render, headers, fixed={"C": C, "O": O, "k": k, "H": H})
