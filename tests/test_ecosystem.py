"""The layer wherever ``nn.Conv2d`` goes: torch.compile with its default arguments, ONNX (both
exporters, run by onnxruntime), deployment without the package, TorchScript, torch.func and
opacus per-sample gradients, FLOP counters (torch's, fvcore, ptflops); and the defaults and
errors a drop-in user meets. One test per tool; each builds the same small model."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dyconv_teach import DynamicConv2d, set_temperature
from dyconv_teach.flops import fvcore_handle, layer_macs, ptflops_hook
from dyconv_teach.functional import DtypeMismatchError, TensorMismatchError, dynamic_conv2d


def model(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """A stem conv, then three dynamic layers (one grouped and strided), then a classifier."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        DynamicConv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        DynamicConv2d(16, 16, 3, stride=2, groups=2, padding=1),
        nn.ReLU(),
        DynamicConv2d(16, 8, 1, bias=False),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5),
    ).to(dtype).eval()


def batch(B: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(B, 3, 12, 12, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def close(a: Any, b: Any) -> None:
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-4, atol=1e-5)


# -- torch.compile ------------------------------------------------------------------------------


def test_compile_with_default_arguments_has_no_graph_break() -> None:
    """``torch.compile(model, dynamic=True)`` (``fullgraph=False``, inductor): batch sizes 2, 3, 5
    run forward and backward in one graph, without a graph break, equal to eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    net = model().train()
    eager = copy.deepcopy(net)
    compiled = torch.compile(net, dynamic=True)
    for B in (2, 3, 5):
        x = batch(B, seed=B)
        out, expected = compiled(x), eager(x)
        close(out, expected)
        out.square().sum().backward()
        expected.square().sum().backward()
        for (name, p), q in zip(net.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=name)
        net.zero_grad()
        eager.zero_grad()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1


# -- ONNX -------------------------------------------------------------------------------------


def onnx_outputs(path: Path, inputs: List[Tensor]) -> List[Any]:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path))
    name = session.get_inputs()[0].name
    return [session.run(None, {name: x.numpy()})[0] for x in inputs]


def test_onnx_export_with_a_dynamic_batch(tmp_path: Path) -> None:
    """Both exporters, the dynamo one with a ``Dim`` batch and the TorchScript one with
    ``dynamic_axes``; onnxruntime gives the eager result at batch 1 and 4."""
    pytest.importorskip("onnxscript")
    net = model()
    inputs = [batch(1, seed=1), batch(4, seed=4)]
    program = torch.onnx.export(net, (batch(2),), dynamo=True, verbose=False,
                                dynamic_shapes=({0: torch.export.Dim("batch")},))
    program.save(str(tmp_path / "dynamo.onnx"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(net, (batch(2),), str(tmp_path / "script.onnx"), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    for name in ("dynamo.onnx", "script.onnx"):
        for x, y in zip(inputs, onnx_outputs(tmp_path / name, inputs)):
            close(y, net(x).detach())


# -- deployment without the package ---------------------------------------------------------

LOADER = """
import sys, torch
kind, path, inputs = sys.argv[1], sys.argv[2], torch.load(sys.argv[3])
module = torch.export.load(path).module() if kind == "export" else torch.jit.load(path)
torch.save([module(x) for x in inputs["x"]], sys.argv[4])
assert not any(name.startswith("dyconv_teach") for name in sys.modules), "the package was imported"
"""


@pytest.mark.parametrize("kind", ["export", "script", "trace"])
def test_saved_programs_run_where_the_package_is_not(kind: str, tmp_path: Path) -> None:
    """An exported program lowered to core ATen (``run_decompositions``), a scripted and a traced
    model save, load and run in a fresh process that never imports dyconv_teach (none of them holds
    an operator of the package), at batch sizes other than the example's."""
    net = model()
    path = tmp_path / "model.pt2"
    if kind == "export":
        program = torch.export.export(net, (batch(2),), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program.run_decompositions(), str(path))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notices
            saved = torch.jit.script(net) if kind == "script" else torch.jit.trace(net, batch(2))
        saved.save(str(path))
    inputs = {"x": [batch(1, seed=1), batch(3, seed=3)]}
    torch.save(inputs, tmp_path / "inputs.pt")
    done = subprocess.run([sys.executable, "-c", LOADER, kind, str(path), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "outputs.pt")], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for x, y in zip(inputs["x"], torch.load(tmp_path / "outputs.pt")):
        close(y, net(x))


# -- TorchScript ------------------------------------------------------------------------------


def test_torchscript_script_and_trace() -> None:
    """``torch.jit.script`` compiles the layer and a model (forward equal to eager at several batch
    sizes, unbatched input too); ``set_temperature`` reaches the scripted copy's layers. A trace
    serves every batch size and keeps the temperature it was traced with (as documented)."""
    net = model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted, traced = torch.jit.script(net), torch.jit.trace(net, batch(2))
        layer = torch.jit.script(net[3])
    for B in (1, 3):
        close(scripted(batch(B, seed=B)), net(batch(B, seed=B)))
        close(traced(batch(B, seed=B)), net(batch(B, seed=B)))
    features = net[:3](batch(1))[0]
    close(layer(features), net[3](features))
    before = net(batch(3))
    assert set_temperature(scripted, 5.0) == 3 and set_temperature(net, 5.0) == 3
    close(scripted(batch(3)), net(batch(3)))
    close(traced(batch(3)), before)  # frozen at the temperature of the trace
    assert not torch.allclose(before, net(batch(3)))


# -- torch.func and opacus ----------------------------------------------------------------------


def per_sample_grads(net: nn.Module, x: Tensor, y: Tensor) -> Dict[str, Tensor]:
    """The gradient of each sample's loss, one backward per sample (the reference)."""
    grads: Dict[str, List[Tensor]] = {name: [] for name, _ in net.named_parameters()}
    for i in range(x.shape[0]):
        loss = F.cross_entropy(net(x[i : i + 1]), y[i : i + 1], reduction="sum")
        for (name, _), g in zip(net.named_parameters(), torch.autograd.grad(loss, list(net.parameters()))):
            grads[name].append(g)
    return {name: torch.stack(g) for name, g in grads.items()}


def test_torch_func_grad_and_per_sample_gradients() -> None:
    """``torch.func.grad`` equals autograd, and ``vmap(grad(...))`` equals a per-sample loop."""
    from torch.func import functional_call, grad, vmap

    net = model(torch.float64).train()
    net[1].eval()  # BatchNorm with running statistics: per-sample gradients need no batch statistics
    x, y = batch(4, dtype=torch.float64), torch.tensor([0, 3, 1, 4])
    params = {name: p.detach() for name, p in net.named_parameters()}
    buffers = dict(net.named_buffers())

    def loss(params: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(net, (params, buffers), (x,)), y, reduction="sum")

    whole = grad(loss)(params, x, y)
    autograd = torch.autograd.grad(loss(dict(net.named_parameters()), x, y), list(net.parameters()))
    for name, g in zip(params, autograd):
        torch.testing.assert_close(whole[name], g, msg=name)
    each = vmap(grad(lambda p, x, y: loss(p, x[None], y[None])), in_dims=(None, 0, 0))(params, x, y)
    expected = per_sample_grads(net, x, y)
    for name in params:
        torch.testing.assert_close(each[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)
    copy.deepcopy(net)  # no tensor of the transforms was left in the layers (last_attention)


def test_opacus_grad_sample_module() -> None:
    """opacus' ``GradSampleModule`` (strict: no buffer in a trainable layer) accepts the layer and
    its per-sample gradients equal a per-sample loop."""
    opacus = pytest.importorskip("opacus")
    net = model(torch.float64).train()
    net[1] = nn.GroupNorm(2, 8).double()  # opacus refuses BatchNorm, whose statistics mix the samples
    reference = copy.deepcopy(net)
    x, y = batch(4, dtype=torch.float64), torch.tensor([0, 3, 1, 4])
    expected = per_sample_grads(reference, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opacus' note on full backward hooks
        wrapped = opacus.GradSampleModule(net, loss_reduction="sum")
        F.cross_entropy(wrapped(x), y, reduction="sum").backward()
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad_sample, expected[name], rtol=1e-9, atol=1e-12, msg=name)


# -- FLOP counters --------------------------------------------------------------------------


def macs_by_layer(net: nn.Module, x: Tensor) -> List[Dict[str, int]]:
    """:func:`layer_macs` of every dynamic layer of ``net`` for input ``x``, read with forward hooks."""
    seen: List[Dict[str, int]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(layer_macs(m, i[0].shape, o.shape)))
             for m in net.modules() if isinstance(m, DynamicConv2d)]
    net(x)
    for hook in hooks:
        hook.remove()
    return seen


def test_layer_macs_count_the_parts() -> None:
    """One sample of the first layer: a static convolution's multiply-adds, the mixing of 4 kernels
    and biases, the pooling's additions and the attention's two linear layers (hidden width 4)."""
    (first, *_) = macs_by_layer(model(), batch(2))
    assert first == {"convolution": 2 * 16 * 8 * 9 * 144, "mixing": 2 * 4 * (16 * 8 * 9 + 16),
                     "pooling": 2 * 8 * 144, "attention": 2 * (8 * 4 + 4 * 4)}


def test_flop_counters_count_convolution_mixing_and_attention() -> None:
    """torch's counter (as is), fvcore (with the package's handle) and ptflops (its aten backend as
    is; its default backend with the package's hook) count the dynamic layers' convolutions, mixing
    and attention. Each is compared with the same model's static twin, whose count it gets right."""
    net, x = model(), batch(2)
    layers = macs_by_layer(net, x)
    extra = sum(m["mixing"] + m["attention"] for m in layers)  # what a static twin does not do
    static = copy.deepcopy(net)
    for i in (3, 5, 7):
        old = net[i]
        static[i] = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                              groups=old.groups, bias=old.bias is not None)

    from torch.utils.flop_counter import FlopCounterMode

    counts: Dict[str, int] = {}
    for name, m in (("dynamic", net), ("static", static)):
        with FlopCounterMode(display=False) as counter:
            m(x)
        counts[name] = counter.get_total_flops() // 2  # FLOPs: two per multiply-add
    assert counts["dynamic"] - counts["static"] == extra

    fvcore = pytest.importorskip("fvcore.nn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, m in (("dynamic", net), ("static", static)):
            analysis = fvcore.FlopCountAnalysis(m, x).set_op_handle("prim::CallFunction", fvcore_handle)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            counts[name] = analysis.total()
    assert counts["dynamic"] - counts["static"] == extra

    # ptflops counts one sample. Its aten backend counts the operations that run; its default one
    # counts modules, where the hook adds the convolution and the pooling. Both also count an odd
    # operation of their own (a bias, the softmax), hence 2%.
    ptflops = pytest.importorskip("ptflops")
    layers = macs_by_layer(net, batch(1))
    for backend, hooks, parts in (("aten", {}, ("mixing", "attention")),
                                  ("pytorch", {DynamicConv2d: ptflops_hook}, ("mixing", "attention", "pooling"))):
        got = {}
        for name, m in (("dynamic", net), ("static", static)):
            got[name], _ = ptflops.get_model_complexity_info(m, (3, 12, 12), as_strings=False, backend=backend,
                                                           print_per_layer_stat=False, custom_modules_hooks=hooks)
        expected = sum(m[part] for m in layers for part in parts)
        assert got["dynamic"] - got["static"] == pytest.approx(expected, rel=0.02), backend


# -- defaults and errors ------------------------------------------------------------------------


def test_default_temperature_is_the_papers_final_one() -> None:
    """Without a schedule the layer trains at tau = 1 (the paper anneals 30 -> 1): its attention is
    the plain softmax of the logits, and sigmoid routing is CondConv's sigmoid of them."""
    x = batch(3)[:, :1].repeat(1, 8, 1, 1)
    for routing, act in (("softmax", lambda z: torch.softmax(z, -1)), ("sigmoid", torch.sigmoid)):
        layer = DynamicConv2d(8, 4, 3, routing=routing)
        assert layer.temperature == 1.0
        logits = layer.fc2(F.relu(layer.fc1(x.mean(dim=(2, 3)))))
        close(layer.attention(x), act(logits))
        layer.temperature = 30.0
        close(layer.attention(x), act(logits / 30))  # the schedule applies to both routings


def test_initial_scale_is_conv2d_per_kernel() -> None:
    """Each kernel starts as nn.Conv2d's; at uniform attention the mix of K = 4 independent kernels,
    and so the output, has about 1/sqrt(4) = 1/2 of nn.Conv2d's spread (documented)."""
    torch.manual_seed(0)
    layer, conv = DynamicConv2d(64, 64, 3, num_kernels=4, bias=False), nn.Conv2d(64, 64, 3, bias=False)
    x = torch.randn(8, 64, 16, 16)
    uniform = torch.full((8, 4), 0.25)
    ratio = (dynamic_conv2d(x, layer.bank, uniform).std() / conv(x).std()).item()
    assert 0.45 < ratio < 0.55, ratio


def test_nan_spoils_its_own_sample_only() -> None:
    """One NaN pixel: the sample's attention pools it, so its whole output is NaN (documented);
    the other samples are untouched."""
    layer, x = DynamicConv2d(8, 4, 3, padding=1), torch.randn(3, 8, 9, 9)
    clean = layer(x)
    x[1, 2, 4, 4] = float("nan")
    out = layer(x)
    assert out[1].isnan().all() and torch.equal(out[[0, 2]], clean[[0, 2]])


def test_last_attention_is_the_last_forwards() -> None:
    """``last_attention`` holds the attention of the last forward (documented for threads: the last
    writer wins); ``layer.attention(x)`` gives any call's own."""
    layer = DynamicConv2d(8, 4, 3)
    a, b = torch.randn(2, 8, 6, 6), torch.randn(3, 8, 6, 6)
    layer(a)
    layer(b)
    close(layer.last_attention, layer.attention(b))
    assert layer.last_attention.shape == (3, 4)


ERRORS: List[Tuple[str, Callable[[], Any], Callable[[], Any], type]] = [
    ("channels", lambda: DynamicConv2d(8, 4, 3)(torch.randn(2, 5, 6, 6)),
     lambda: nn.Conv2d(8, 4, 3)(torch.randn(2, 5, 6, 6)), TensorMismatchError),
    ("2-D input", lambda: DynamicConv2d(8, 4, 3)(torch.randn(8, 6)),
     lambda: nn.Conv2d(8, 4, 3)(torch.randn(8, 6)), TensorMismatchError),
    ("kernel larger than input", lambda: DynamicConv2d(8, 4, 5)(torch.randn(2, 8, 3, 3)),
     lambda: nn.Conv2d(8, 4, 5)(torch.randn(2, 8, 3, 3)), TensorMismatchError),
    ("dtype", lambda: DynamicConv2d(8, 4, 3)(torch.randn(2, 8, 6, 6, dtype=torch.float64)),
     lambda: nn.Conv2d(8, 4, 3)(torch.randn(2, 8, 6, 6, dtype=torch.float64)), DtypeMismatchError),
    ("attention shape", lambda: dynamic_conv2d(torch.randn(2, 8, 6, 6), torch.randn(3, 4, 8, 3, 3), torch.randn(3, 3)),
     lambda: F.conv2d(torch.randn(2, 8, 6, 6), torch.randn(4, 9, 3, 3)), TensorMismatchError),
]


@pytest.mark.parametrize("name, ours, theirs, error", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_are_runtime_errors_where_conv2d_raises_them(name: str, ours: Callable[[], Any],
                                                            theirs: Callable[[], Any], error: type) -> None:
    """Where nn.Conv2d raises a RuntimeError, so does the layer (its own error, with its message), so
    ``except RuntimeError`` code written for nn.Conv2d keeps working; it is a ValueError (TypeError
    for a dtype) too."""
    with pytest.raises(RuntimeError):
        theirs()
    with pytest.raises(RuntimeError) as caught:
        ours()
    assert isinstance(caught.value, error) and isinstance(caught.value, (ValueError, TypeError))
