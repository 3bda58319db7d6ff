"""dyconv_teach.teaching.family and the chapter 11 explorer: every variant's mixing step, one batching step."""

from __future__ import annotations

import html
import itertools
import json
import re

import pytest
import torch

from dyconv_teach.strategies import batch_as_groups_conv
from dyconv_teach.teaching.family import (
    VARIANTS,
    DCD2d,
    batch,
    build_layer,
    family_shapes,
    mix_kernels,
    multiply_adds,
    parameter_parts,
    per_sample_loop,
)
from dyconv_teach.teaching.shapes import EXAMPLE
from dyconv_teach.teaching.widgets import family_explorer

SETTINGS = list(itertools.product(VARIANTS, (1, 2, 3, 8), (1, 2, 5, 8)))


def shown_text(fragment: str) -> str:
    inline = re.sub(r"</?span[^>]*>", "", fragment)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", inline)).split())


@pytest.mark.parametrize("variant, B, K", SETTINGS)
def test_every_variant_batches_exactly(variant: str, B: int, K: int) -> None:
    r = family_shapes(variant, B, K)
    C, O, k, H = EXAMPLE.C, EXAMPLE.O, EXAMPLE.k, EXAMPLE.H
    assert r.matches_loop and r.matches_layer and r.max_difference < 1e-12
    # The batching step is the same call for every variant.
    assert (r.batch_call.input, r.batch_call.weight, r.batch_call.groups) == ((1, B * C, H, H), (B * O, C, k, k), B)
    assert r.batch_call.output == (1, B * O, H, H) and r.output == (B, O, H, H)
    [kernels] = [s.shape for s in r.steps if s.symbols == "[B, O, C/g, k, k]"]
    assert kernels == (B, O, C, k, k)


@pytest.mark.parametrize("variant", VARIANTS)
def test_mixing_shapes_are_the_tensors(variant: str) -> None:
    B, K, C, O, k = 3, 5, 8, 6, 3
    layer = build_layer(variant, C, O, k, K)
    x = torch.randn(B, C, 9, 9, dtype=torch.float64)
    mixed = mix_kernels(variant, layer, x)
    shapes = {s.symbols: s.shape for s in mixed.steps}
    assert mixed.kernels.shape == (B, O, C, k, k)
    if variant in ("CondConv", "DyConv"):
        assert shapes["[B, K]"] == (B, K) and shapes["[K, O, C/g, k, k]"] == tuple(layer.bank.shape)
    elif variant == "ODConv":
        assert shapes["[B, 1, 1, 1, k, k]"] == (B, 1, 1, 1, k, k) and shapes["[B, C, 1, 1]"] == (B, C, 1, 1)
        assert shapes["[B, O, 1, 1]"] == (B, O, 1, 1) and shapes["[B, K, 1, 1, 1, 1]"] == (B, K, 1, 1, 1, 1)
        assert shapes["[B, K, O, C/g, k, k]"] == (B, K, O, C, k, k)
    else:
        L = layer.latent
        assert L == int((4 * C) ** 0.5) == 5
        assert shapes["[L, C]"] == (L, C) and shapes["[B, L, L]"] == (B, L, L) and shapes["[O, L]"] == (O, L)
        assert shapes["[B, O, C]"] == (B, O, C) and mixed.bias is not None and mixed.bias.shape == (B, O)
    out, _ = batch(x, mixed, layer)
    torch.testing.assert_close(out, per_sample_loop(x, mixed, layer))
    torch.testing.assert_close(out, layer(x))


def test_odconv_groups_and_stride() -> None:
    from dyconv_teach import ODConv2d

    layer = ODConv2d(8, 6, 3, stride=2, padding=1, groups=2, num_kernels=3).double().eval()
    x = torch.randn(4, 8, 9, 7, dtype=torch.float64)
    mixed = mix_kernels("ODConv", layer, x)
    out = batch_as_groups_conv(x, mixed.kernels, None, layer.stride, layer.padding, layer.dilation, 2)
    torch.testing.assert_close(out, layer(x))


def test_dcd_follows_the_official_sizes_and_needs_eval() -> None:
    layer = DCD2d(64, 64, 3)
    assert layer.latent == 16 and layer.fc.out_features == 16  # conv_basic_dy: sqrt(4*64), max(256, 256) // 16
    assert DCD2d(64, 64, 3, pool=1).latent == 8  # conv_dy: sqrt(64)
    with pytest.raises(ValueError, match="eval"):
        mix_kernels("DCD", layer.double().train(), torch.randn(2, 64, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="odd"):
        DCD2d(4, 4, 2)


def test_parameters_and_multiply_adds_of_one_layer() -> None:
    layers = {v: build_layer(v, 64, 64, 3, 4) for v in VARIANTS}
    parts = {v: parameter_parts(layer) for v, layer in layers.items()}
    for v, layer in layers.items():
        assert sum(parts[v].values()) == sum(p.numel() for p in layer.parameters())
    assert parts["DyConv"]["kernels"] == 4 * 64 * 64 * 9 + 4 * 64 and parts["DCD"]["kernels"] == 64 * 64 * 9
    assert parts["DCD"]["P and Q"] == 2 * 16 * 64 + 4 * 16
    x = torch.randn(1, 64, 56, 56, dtype=torch.float64)
    conv = 64 * 64 * 9 * 56 * 56
    assert multiply_adds(layers["DyConv"], x) == conv + 4 * (64 * 64 * 9 + 64) + 64 * 16 + 16 * 4
    # DCD: Theta_s, then Q and P (1 x 1, C <-> L = 16) and Phi [16, 16] at every pixel, then the router.
    latent = 2 * 64 * 16 * 56 * 56 + 16 * 16 * 56 * 56
    assert multiply_adds(layers["DCD"], x) == conv + latent + 256 * 16 + 16 * 16 + 16 * 256 + 16 * 64


def test_unknown_variant() -> None:
    with pytest.raises(ValueError, match="variant must be one of"):
        build_layer("DynamicConv", 4, 6, 3, 2)


# -- the explorer ----------------------------------------------------------------------------------


def test_explorer_over_its_live_range() -> None:
    explorer = family_explorer()
    assert [c.live for c in explorer.controls] == [(0, 1, 2, 3), tuple(range(1, 9)), tuple(range(1, 9))]
    batching = {}
    for setting in explorer.live_settings():
        B, K = setting["B"], setting["K"]
        variant = VARIANTS[setting["variant"]]
        fragments = explorer.render(**setting)
        r = family_shapes(variant, B, K)
        mixing = shown_text(fragments["mixing"])
        for step in r.steps:
            assert step.what in mixing
            if step.shape is not None:
                assert str(list(step.shape)) in mixing
        if variant == "DCD":
            assert f"K = {K} plays no role" in mixing and f"= {r.latent} dimensions" in mixing
            assert "[B, K]" not in mixing
        if variant == "CondConv":
            assert "need not sum to 1" in mixing
        text = shown_text(fragments["batching"])
        assert "batched == per-sample loop: True" in text and "batched == the layer's own forward: True" in text
        # The batching step: identical for every variant.
        batching.setdefault((B, K), set()).add(fragments["batching"])
    assert all(len(shown) == 1 for shown in batching.values())


def test_explorer_fallback_names_its_options() -> None:
    explorer = family_explorer()
    text = explorer._repr_mimebundle_()["text/html"]
    assert text.startswith('<div class="dyconv-explorer" data-explorer="family"')
    select = re.search(r'<select data-param="variant" disabled>(.*?)</select>', text).group(1)
    assert re.findall(r'<option value="(\d)"[^>]*>(\w+)</option>', select) == [
        ("0", "CondConv"), ("1", "DyConv"), ("2", "ODConv"), ("3", "DCD")]
    assert '<option value="2" selected>2</option>' in text  # B, a number as before
    data = json.loads(re.search(r'class="dyconv-data">(.*?)</script>', text, re.S).group(1))
    assert data["params"] == ["variant", "B", "K"] and len(data["table"]) == len(explorer.grid()) == 48
    for setting in explorer.grid()[::7]:
        entry = data["table"][",".join(map(str, setting.values()))]
        assert [data["fragments"][i] for i in entry] == [explorer.render(**setting)[r] for r in explorer.roles]
    assert len(text.encode()) < 1_000_000


def test_explorer_live_widget_is_a_menu_of_names() -> None:
    import ipywidgets

    widget = family_explorer().widget()
    menus = [w for w in widget.children[1].children if isinstance(w, ipywidgets.Dropdown)]
    [menu] = menus
    assert [name for name, _ in menu.options] == list(VARIANTS) and menu.value == 0
    menu.value = 3
    assert "plays no role" in widget.children[3].value
