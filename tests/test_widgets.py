"""dyconv_teach.teaching.widgets: the three explorers, over every setting their live sliders reach."""

from __future__ import annotations

import html
import itertools
import json
import re
from typing import Callable, Dict, List, Tuple

import pytest

from dyconv_teach.teaching import widgets
from dyconv_teach.teaching.explain import groups_problem
from dyconv_teach.teaching.explorer import Explorer
from dyconv_teach.teaching.shapes import EXAMPLE, batch_kernel_shapes, grouped_conv_shapes, static_conv_shapes
from dyconv_teach.teaching.widgets import batch_kernel_explorer, grouped_conv_explorer, static_conv_explorer

EXPLORERS: Dict[str, Callable[[], Explorer]] = {
    "static": static_conv_explorer,
    "grouped": grouped_conv_explorer,
    "batch_kernel": batch_kernel_explorer,
}
ERROR = re.compile(
    r'<div class="dyconv-error"><p><b>(.*?) raised (\w+):</b><br><code>(.*?)</code></p>'
    r'<p class="dyconv-why"><b>What it means:</b> (.*?)</p></div>', re.S
)


def shown_text(fragment: str) -> str:
    """The text a reader sees, with runs of white space as one space."""
    inline = re.sub(r"</?span[^>]*>", "", fragment)  # spans keep shapes on one line, inside a text
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", inline)).split())


def errors(fragments: Dict[str, str]) -> List[Tuple[str, str, str, str]]:
    """(where, exception type, torch's message, sentence) of every error the fragments show."""
    found = [tuple(shown_text(part) for part in m) for m in ERROR.findall("".join(fragments.values()))]
    assert len(found) == "".join(fragments.values()).count('class="dyconv-error"'), "an error without its sentence"
    return found  # type: ignore[return-value]


@pytest.mark.parametrize("kind", sorted(EXPLORERS))
def test_fallback_holds_the_grid_and_reads_without_script(kind: str) -> None:
    explorer = EXPLORERS[kind]()
    text = explorer._repr_mimebundle_()["text/html"]
    assert text.startswith(f'<div class="dyconv-explorer" data-explorer="{kind}"') and "dyconv-notice" in text
    data = json.loads(re.search(r'class="dyconv-data">(.*?)</script>', text, re.S).group(1))
    assert len(data["table"]) == len(explorer.grid())
    for setting in explorer.grid()[:: max(1, len(explorer.grid()) // 12)]:
        entry = data["table"][",".join(map(str, setting.values()))]
        assert [data["fragments"][i] for i in entry] == [explorer.render(**setting)[r] for r in explorer.roles]
    assert EXPLORERS[kind]().to_html() == text
    assert len(text.encode()) < 1_000_000, f"fallback is {len(text.encode())} bytes"


def test_defaults_are_the_running_example() -> None:
    assert static_conv_explorer().defaults() == {"C": EXAMPLE.C, "O": EXAMPLE.O, "k": EXAMPLE.k, "stride": 1,
                                                 "padding": 0, "dilation": 1, "H": EXAMPLE.H}
    assert grouped_conv_explorer().defaults() == {"C": EXAMPLE.C, "O": EXAMPLE.O, "g": 2}
    batch = batch_kernel_explorer()
    assert batch.defaults() == {"B": EXAMPLE.B, "K": EXAMPLE.K, "g": 1}
    assert batch.fixed == {"C": EXAMPLE.C, "O": EXAMPLE.O, "k": EXAMPLE.k, "H": EXAMPLE.H}


# -- chapter 2 -------------------------------------------------------------------------------------


def static_settings() -> List[Dict[str, int]]:
    """A dense product of the live ranges: every k, padding, dilation, each H up to where the
    largest dilated kernel fits, two strides; and every C, O."""
    live = {c.name: c.live for c in static_conv_explorer().controls}
    assert live["H"] == tuple(range(1, 65)) and live["stride"] == (1, 2, 3, 4)
    settings = [
        {"C": 1, "O": 1, "k": k, "stride": s, "padding": p, "dilation": d, "H": H}
        for k, s, p, d, H in itertools.product(live["k"], (1, 4), live["padding"], live["dilation"],
                                               (*range(1, 21), 28, 41, 64))
    ]
    settings += [{"C": C, "O": O, "k": 3, "stride": 2, "padding": 1, "dilation": 1, "H": 9}
                 for C, O in itertools.product(live["C"], live["O"])]
    return settings


def test_static_explorer_over_its_live_range() -> None:
    explorer = static_conv_explorer()
    failures = 0
    for setting in static_settings():
        fragments = explorer.render(**setting)
        r = static_conv_shapes(**setting)
        text = shown_text(fragments["shapes"])
        assert " ".join(r.formula.split()) in shown_text(fragments["formula"])
        if r.error is None:
            assert str(list(r.output)) in text and not errors(fragments)
            continue
        failures += 1
        [(where, exc, message, why)] = errors(fragments)
        assert (where, exc, message) == ("F.conv2d", "RuntimeError", r.error)
        span = setting["dilation"] * (setting["k"] - 1) + 1
        assert why.startswith("The kernel spans dilation*(k - 1) + 1") and f"= {span} pixels" in why
    assert failures > 1000


# -- chapter 3 -------------------------------------------------------------------------------------


def test_grouped_explorer_over_its_live_range(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = []
    # The wiring diagrams are tested in test_plots; here only which one is drawn.
    monkeypatch.setattr(widgets, "svg_image", lambda draw, *args: drawn.append(args) or f"<img {args}>")
    explorer = grouped_conv_explorer()
    for setting in explorer.live_settings():
        C, O, g = setting["C"], setting["O"], setting["g"]
        fragments = explorer.render(**setting)
        r = grouped_conv_shapes(C, O, g)
        if C % g or O % g:
            [(where, exc, message, why)] = errors(fragments)
            assert (where, exc, message, why) == ("nn.Conv2d(C, O, k, groups=g)", "ValueError", r.error,
                                                  groups_problem(C, O, g))
            assert "torch" not in why and "[" not in why
            assert "no wiring" in shown_text(fragments["diagram"])
        else:
            assert not errors(fragments)
            assert f"[{O}, {C // g}, 3, 3]" in shown_text(fragments["shapes"])
            assert f"= {r.params}, vs {r.params_dense} with g=1" in shown_text(fragments["split"])
            assert drawn[-1] == (C, O, g)
    assert len(explorer.live_settings()) == 16 * 16 * 8


def test_grouped_explorer_c1_g8_explains_the_split() -> None:
    fragments = grouped_conv_explorer().render(C=1, O=16, g=8)
    text = " ".join(shown_text(f) for f in fragments.values())
    assert "[16, 0, 3, 3]" not in text and "0 channels" not in text
    assert "in_channels must be divisible by groups" in text and "g must divide C" in text


# -- chapter 5 -------------------------------------------------------------------------------------


def test_batch_kernel_explorer_over_its_live_range() -> None:
    explorer = batch_kernel_explorer()
    assert [c.live for c in explorer.controls] == [tuple(range(1, 9)), tuple(range(1, 9)), (1, 2)]
    C, O, k, H = EXAMPLE.C, EXAMPLE.O, EXAMPLE.k, EXAMPLE.H
    for setting in explorer.live_settings():
        B, K, g = setting["B"], setting["K"], setting["g"]
        fragments = explorer.render(**setting)
        r = batch_kernel_shapes(B, K, C, O, g, k, H)
        # Where K lives and disappears, with the numbers of this setting.
        n = O * (C // g) * k * k
        mix = shown_text(fragments["mix"])
        assert f"[{B}, {K}] @ [{K}, {n}] -> [{B}, {n}]" in mix and f"K (here {K}) lives only in this product" in mix
        assert f"[{B}, {O}, {C // g}, {k}, {k}]" in mix
        found = errors(fragments)
        naive, blog = found[0], found[1:]
        assert naive[:3] == ("F.conv2d", "RuntimeError", r.naive_error)
        assert "has 5 axes" in naive[3] and f"no axis for B = {B}" in naive[3]
        if B == 1:
            assert not blog and f"works for B=1: output [1, {O}," in shown_text(fragments["blog"])
        else:
            [(where, exc, message, why)] = blog
            assert (where, message) == (f"the blog's F.conv2d (B={B})", r.blog_error)
            # The sentence names the axis torch's message points at, in the book's symbols.
            if "at dimension 0" in message:
                assert f"axis 0 of the weight [O, B*C/g, k, k] = [{O}, {B * C // g}, {k}, {k}]" in why
            else:
                assert f"to have {B * C * B} channels" in message
                assert f"torch expects {B * C // g} * {g * B} = {B * B * C} input channels" in why
        assert "torch.allclose(trick, per-sample loop): True" in shown_text(fragments["trick"])
        assert f"viewed back [B, O, H', W'] [{B}, {O}, {H - k + 1}, {H - k + 1}]" in shown_text(fragments["trick"])


@pytest.mark.parametrize("B, g, words", [
    (3, 1, "expected weight to be divisible by 3 at dimension 0"),
    (3, 2, "expected weight to be at least 6 at dimension 0"),
])
def test_batch_kernel_explorer_explains_the_blog_errors_for_o4(B: int, g: int, words: str) -> None:
    # C = O = 4, the first edition's example: the blog's weight has too few kernels for g*B groups.
    fragments = batch_kernel_explorer(C=4, O=4).render(B=B, K=2, g=g)
    [(_, _, message, why)] = errors(fragments)[1:]
    assert words in message
    assert why.startswith(f"groups = g*B = {g * B} ") and "axis 0 of the weight [O, B*C/g, k, k]" in why


def test_batch_kernel_explorer_draws_the_trick_for_its_b() -> None:
    diagram = batch_kernel_explorer().render(B=8, K=5, g=2)["diagram"]
    assert f'<img alt="draw_batch_as_groups(8, {EXAMPLE.C}, {EXAMPLE.O}, 2)"' in diagram
