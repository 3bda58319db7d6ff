"""The checkers of ``dyconv_teach.teaching.checker``: every known mistake, written here as a reader
would write it, gets its own diagnosis; every correct implementation in the package passes; a
function that raises gets a plain message; and the report reads as a learner needs it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from dyconv_teach import dynamic_conv2d, reference, strategies
from dyconv_teach.teaching import checker
from dyconv_teach.teaching.checker import (
    ATTENTION_CASES,
    ATTENTION_MISTAKES,
    CONV_CASES,
    CONV_MISTAKES,
    CUT_FROM_GRAPH,
    check_attention,
    check_dynamic_conv,
)

ROOT = Path(__file__).resolve().parents[1]


# -- the functional core, written by a reader: right, then with each known mistake -----------------


def right(x, bank, attention, bias=None, stride=1, padding=0, dilation=1, groups=1):
    B, C, H, W = x.shape
    K, O = bank.shape[:2]
    weight = (attention @ bank.reshape(K, -1)).reshape(B * O, C // groups, *bank.shape[3:])
    b = None if bias is None else (attention @ bias).reshape(B * O)
    out = F.conv2d(x.reshape(1, B * C, H, W), weight, b, stride, padding, dilation, groups * B)
    return out.reshape(B, O, *out.shape[2:])


def five_d_weight(x, bank, attention, bias=None, stride=1, padding=0, dilation=1, groups=1):
    K = bank.shape[0]
    kernels = (attention @ bank.reshape(K, -1)).reshape(len(x), *bank.shape[1:])  # [B, O, C/g, k, k]
    b = None if bias is None else attention @ bias
    return F.conv2d(x, kernels, b, stride, padding, dilation, groups)


def blog_view(x, bank, attention, bias=None, stride=1, padding=0, dilation=1, groups=1):
    # The blog's lines, functional, but with reshape for x: its channels_last error is another one.
    batch_size, in_planes, height, width = x.size()
    K, out_planes, _, kernel_size, _ = bank.shape
    aggregate_weight = torch.mm(attention, bank.view(K, -1)).view(out_planes, -1, kernel_size, kernel_size)
    aggregate_bias = None if bias is None else torch.mm(attention, bias).view(-1)
    output = F.conv2d(x.reshape(1, -1, height, width), aggregate_weight, aggregate_bias, stride, padding, dilation,
                      groups * batch_size)
    return output.view(batch_size, out_planes, output.size(-2), output.size(-1))


def groups_without_batch(x, bank, attention, bias=None, stride=1, padding=0, dilation=1, groups=1):
    B, C, H, W = x.shape
    K, O = bank.shape[:2]
    weight = (attention @ bank.reshape(K, -1)).reshape(B * O, C // groups, *bank.shape[3:])
    b = None if bias is None else (attention @ bias).reshape(B * O)
    out = F.conv2d(x.reshape(1, B * C, H, W), weight, b, stride, padding, dilation, groups)
    return out.reshape(B, O, *out.shape[2:])


def groups_batch_only(x, bank, attention, bias=None, stride=1, padding=0, dilation=1, groups=1):
    B, C, H, W = x.shape
    K, O = bank.shape[:2]
    weight = (attention @ bank.reshape(K, -1)).reshape(B * O, *bank.shape[2:])
    b = None if bias is None else (attention @ bias).reshape(B * O)
    out = F.conv2d(x.reshape(1, B * C, H, W), weight, b, stride, padding, dilation, groups=B)
    return out.reshape(B, O, *out.shape[2:])


def not_reshaped_back(x, bank, attention, bias=None, stride=1, padding=0, dilation=1, groups=1):
    B, C, H, W = x.shape
    K, O = bank.shape[:2]
    weight = (attention @ bank.reshape(K, -1)).reshape(B * O, *bank.shape[2:])
    b = None if bias is None else (attention @ bias).reshape(B * O)
    return F.conv2d(x.reshape(1, B * C, H, W), weight, b, stride, padding, dilation, groups * B)


def view_not_reshape(x, bank, attention, bias=None, stride=1, padding=0, dilation=1, groups=1):
    B, C, H, W = x.shape
    K, O = bank.shape[:2]
    weight = (attention @ bank.view(K, -1)).view(B * O, *bank.shape[2:])
    b = None if bias is None else (attention @ bias).view(B * O)
    out = F.conv2d(x.view(1, B * C, H, W), weight, b, stride, padding, dilation, groups * B)
    return out.view(B, O, *out.shape[2:])


def width_first(x, bank, attention, bias=None, stride=1, padding=0, dilation=1, groups=1):
    B, C, W, H = x.shape  # chapter 6's slip
    K, O = bank.shape[:2]
    weight = (attention @ bank.reshape(K, -1)).reshape(B * O, *bank.shape[2:])
    b = None if bias is None else (attention @ bias).reshape(B * O)
    out = F.conv2d(x.reshape(1, B * C, H, W), weight, b, stride, padding, dilation, groups * B)
    return out.reshape(B, O, *out.shape[2:])


def output_width_first(x, bank, attention, bias=None, stride=1, padding=0, dilation=1, groups=1):
    out = right(x, bank, attention, bias, stride, padding, dilation, groups)
    B, O, H_out, W_out = out.shape
    return out.reshape(B, O, W_out, H_out)


def attention_axes_swapped(x, bank, attention, bias=None, stride=1, padding=0, dilation=1, groups=1):
    # torch.mm where the checker's own slip uses einsum: the error messages differ when B != K
    B, C, H, W = x.shape
    K, O = bank.shape[:2]
    weight = torch.mm(attention.t(), bank.reshape(K, -1)).reshape(B * O, *bank.shape[2:])
    b = None if bias is None else torch.mm(attention.t(), bias).reshape(B * O)
    out = F.conv2d(x.reshape(1, B * C, H, W), weight, b, stride, padding, dilation, groups * B)
    return out.reshape(B, O, *out.shape[2:])


def with_bias(mixed_bias: Callable) -> Callable:
    """``right`` with another sample bias ``[B*O]``, or none."""

    def conv(x, bank, attention, bias=None, stride=1, padding=0, dilation=1, groups=1):
        out = right(x, bank, attention, None, stride, padding, dilation, groups)
        b = None if bias is None else mixed_bias(attention, bias)
        return out if b is None else out + b.reshape(len(x), -1, 1, 1)

    return conv


def detached(x, bank, attention, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return right(x, bank, attention.detach(), bias, stride, padding, dilation, groups)


#: One reader's function per mistake the checker knows, by the mistake's name.
CONV_SLIPS: Dict[str, Callable] = {
    "naive_5d": five_d_weight,
    "blog_view": blog_view,
    "groups_without_batch": groups_without_batch,
    "groups_batch_only": groups_batch_only,
    "not_reshaped_back": not_reshaped_back,
    "view_not_reshape": view_not_reshape,
    "height_width_swapped": width_first,
    "attention_axes_swapped": attention_axes_swapped,
    "bias_averaged": with_bias(lambda pi, bias: bias.mean(0).repeat(len(pi))),
    "bias_transposed": with_bias(lambda pi, bias: (pi @ bias).t().reshape(-1)),
    "bias_left_out": with_bias(lambda pi, bias: None),
    "cut_from_graph": detached,
}


# -- the attention branch, written by a reader -------------------------------------------------------


def attention_right(x, fc1, fc2, temperature):
    pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return torch.softmax(fc2(F.relu(fc1(pooled))) / temperature, dim=-1)


def softmax_over_batch(x, fc1, fc2, temperature):
    return torch.softmax(fc2(F.relu(fc1(x.mean(dim=(2, 3))))) / temperature, dim=0)


def no_temperature(x, fc1, fc2, temperature):
    return F.softmax(fc2(F.relu(fc1(x.mean(dim=(2, 3))))), dim=1)


def temperature_multiplied(x, fc1, fc2, temperature):
    return F.softmax(temperature * fc2(F.relu(fc1(x.mean(dim=(2, 3))))), dim=1)


def no_relu(x, fc1, fc2, temperature):
    return F.softmax(fc2(fc1(x.mean(dim=(2, 3)))) / temperature, dim=1)


def attention_detached(x, fc1, fc2, temperature):
    return attention_right(x.detach(), fc1, fc2, temperature)


ATTENTION_SLIPS: Dict[str, Callable] = {
    "softmax_over_batch": softmax_over_batch,
    "no_temperature": no_temperature,
    "temperature_multiplied": temperature_multiplied,
    "no_relu": no_relu,
    "cut_from_graph": attention_detached,
}


# -- tests -----------------------------------------------------------------------------------------


def test_every_known_mistake_has_a_reader_version_here() -> None:
    assert set(CONV_SLIPS) == {m.name for m in CONV_MISTAKES} | {CUT_FROM_GRAPH.name}
    assert set(ATTENTION_SLIPS) == {m.name for m in ATTENTION_MISTAKES} | {CUT_FROM_GRAPH.name}


@pytest.mark.parametrize("name", CONV_SLIPS)
def test_each_conv_mistake_gets_its_diagnosis(name: str, capsys: pytest.CaptureFixture) -> None:
    result = check_dynamic_conv(CONV_SLIPS[name])
    assert not result and result.mistake is not None and result.mistake.name == name, result.report
    assert capsys.readouterr().out == result.report + "\n"
    assert f"Likely mistake: {result.mistake.what}." in result.report
    assert "Read: chapter" in result.report and result.mistake.where().split(",")[0] in result.report


@pytest.mark.parametrize("name", ATTENTION_SLIPS)
def test_each_attention_mistake_gets_its_diagnosis(name: str) -> None:
    result = check_attention(ATTENTION_SLIPS[name])
    assert not result and result.mistake is not None and result.mistake.name == name, result.report


def test_the_second_way_of_swapping_height_and_width_gets_the_diagnosis_too() -> None:
    result = check_dynamic_conv(output_width_first)
    assert result.mistake is not None and result.mistake.name == "height_width_swapped", result.report
    assert result.failed is not None and result.failed.H != result.failed.W
    assert result.problem == "a tensor of shape [2, 6, 5, 7]"  # [B, O, W', H'] for a 9 x 7 input


@pytest.mark.parametrize("mistake", CONV_MISTAKES + ATTENTION_MISTAKES, ids=lambda m: m.name)
def test_each_wrong_implementation_of_the_checker_gets_its_own_mistake(mistake: checker.Mistake) -> None:
    """No mistake hides another: each of its wrong implementations is diagnosed as itself."""
    check = check_dynamic_conv if mistake in CONV_MISTAKES else check_attention
    assert mistake.implementations
    for implementation in mistake.implementations:
        result = check(implementation)
        assert result.mistake == mistake, result.report


def adapter(run: Callable) -> Callable:
    """A strategy, which takes stride, padding and dilation as pairs, with the core's signature."""

    def conv(x, bank, attention, bias=None, stride=1, padding=0, dilation=1, groups=1):
        return run(x, bank, attention, bias, _pair(stride), _pair(padding), _pair(dilation), groups)

    conv.__name__ = run.__name__
    return conv


def keywords(fn: Callable) -> Callable:
    """A reference, which takes stride, padding, dilation and groups as keywords."""

    def conv(x, bank, attention, bias=None, stride=1, padding=0, dilation=1, groups=1):
        return fn(x, bank, attention, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)

    conv.__name__ = fn.__name__
    return conv


CORRECT = {
    "dynamic_conv2d": dynamic_conv2d,
    "reader": right,
    "per_sample_conv": keywords(reference.per_sample_conv),
    "kernel_sum_conv": keywords(reference.kernel_sum_conv),
    **{name: adapter(s.run) for name, s in strategies.STRATEGIES.items() if "cpu" in s.devices},
}


@pytest.mark.parametrize("name", CORRECT)
def test_the_reference_the_core_and_every_cpu_strategy_pass(name: str, capsys: pytest.CaptureFixture) -> None:
    result = check_dynamic_conv(CORRECT[name])
    assert result and result.failed is None and result.mistake is None and result.problem == "", result.report
    out = capsys.readouterr().out
    assert out == result.report + "\n"
    assert out.startswith(f"{CORRECT[name].__name__} passes all {len(CONV_CASES)} cases: one sample (B = 1);")
    for phrase in ("as many samples as kernels (B = K = 5)", "a non-square input (9 x 7)", "groups (g = 2)",
                   "a channels_last input", "a bias", "x, bank, attention and bias", "per-sample loop", "float64"):
        assert phrase in " ".join(out.split()), phrase
    assert repr(result) == f"CheckResult(passed=True, cases={len(CONV_CASES)})"


def test_the_layers_attention_passes() -> None:
    result = check_attention(attention_right)
    assert result, result.report
    assert "tau = 30" in result.report and "fc1 and fc2" in result.report
    assert len(ATTENTION_CASES) == 6 and result.report.startswith("attention_right passes all 6 cases")


def test_the_report_of_the_blog_code_reads_as_a_learner_needs_it() -> None:
    report = " ".join(check_dynamic_conv(blog_view).report.split())
    assert report.startswith("blog_view fails case 2 of 9: two samples (B = 2, K = 5). Sizes: B = 2, C = 4, O = 6, "
                             "K = 5, k = 3, g = 1, input 9 x 9, no bias.")
    assert "It passes the cases before it: one sample (B = 1)." in report
    assert "Expected: a tensor [B, O, H', W'] = [2, 6, 7, 7], equal to the output of the per-sample loop" in report
    # where in the reader's code, and torch's own words
    assert re.search(r"Got: RuntimeError at line \d+ of blog_view: Given groups=2, weight of size \[6, 8, 3, 3\], "
                     r"expected input\[1, 8, 9, 9\] to have 16 channels", report)
    assert "Likely mistake: the blog post's `.view(out_planes, -1, k, k)`." in report
    assert 'Read: chapter 5 (The batch as groups), section "The blog\'s code: `.view(out_planes, -1, k, k)`".' in report
    assert all(len(line) <= 79 for line in check_dynamic_conv(blog_view).report.splitlines())


def test_wrong_values_say_which_samples_are_wrong() -> None:
    result = check_dynamic_conv(CONV_SLIPS["bias_transposed"])
    assert result.failed is not None and result.failed.name == "a bias"
    assert re.fullmatch(r"a tensor of the right shape, \[2, 6, 7, 7\], with other values: the largest difference "
                        r"is [\d.e+-]+, in samples 0, 1", result.problem), result.problem
    result = check_attention(no_temperature)
    assert result.failed is not None and result.failed.temperature == 30.0


def test_a_gradient_that_does_not_arrive_is_named() -> None:
    result = check_dynamic_conv(detached)
    assert result.problem == "the right output, but no gradient reaches attention"
    assert 'Read: chapter 6 (Checking a dynamic convolution), section "Gradients".' in result.report


def test_a_gradient_that_differs_is_named() -> None:
    def bias_mixed_without_gradient(x, bank, attention, bias=None, stride=1, padding=0, dilation=1, groups=1):
        out = right(x, bank, attention, None, stride, padding, dilation, groups)
        return out if bias is None else out + (attention.detach() @ bias)[:, :, None, None]

    result = check_dynamic_conv(bias_mixed_without_gradient)
    assert result.failed is not None and result.failed.name == "a bias"
    assert result.problem.startswith("the right output, but the gradient with respect to attention differs (by up to ")
    assert result.mistake == CUT_FROM_GRAPH


def test_a_second_mistake_does_not_hide_the_first() -> None:
    def two_mistakes(x, bank, attention, bias=None, stride=1, padding=0, dilation=1, groups=1):
        # the bias averaged (fails the case "a bias"), and groups = B (would fail the case "groups")
        averaged = CONV_SLIPS["bias_averaged"] if groups == 1 else groups_batch_only
        return averaged(x, bank, attention, bias, stride, padding, dilation, groups)

    result = check_dynamic_conv(two_mistakes)
    assert result.failed is not None and result.failed.name == "a bias"
    assert result.mistake is not None and result.mistake.name == "bias_averaged", result.report


def test_a_function_that_raises_gets_a_plain_message(capsys: pytest.CaptureFixture) -> None:
    def unfinished(x, bank, attention, bias=None, stride=1, padding=0, dilation=1, groups=1):
        raise NotImplementedError("write the batched call here")

    result = check_dynamic_conv(unfinished)
    out = capsys.readouterr().out
    assert out.startswith("unfinished fails case 1 of 9: one sample (B = 1).")
    assert re.search(r"Got: NotImplementedError at line \d+ of unfinished, `raise NotImplementedError\(\"write the "
                     r"batched call here\"\)`: write the batched call here\.", " ".join(out.split())), out
    assert "Traceback" not in out and "checker.py" not in out
    assert "No known mistake gives this result. Compare your function with chapter 5 (The batch as groups), " \
           'section "The trick in four steps".' in " ".join(out.split())
    assert result.failed == CONV_CASES[0] and result.mistake is None


def test_a_function_with_the_wrong_signature_or_no_return_is_told_so() -> None:
    result = check_dynamic_conv(lambda x, bank, attention: None)
    assert result.problem.startswith("TypeError: ") and "positional arguments" in result.problem
    result = check_dynamic_conv(lambda *args: None)
    assert result.problem == "None: the function returns nothing (a missing return?)"
    result = check_dynamic_conv(lambda *args: right(*args).float())
    assert result.problem == "a torch.float32 tensor; with float64 inputs the output must be float64 too"


def test_the_function_sees_its_own_prints_once_per_case_it_runs(capsys: pytest.CaptureFixture) -> None:
    def chatty(*args):
        print("shape of x:", tuple(args[0].shape))
        return blog_view(*args)

    result = check_dynamic_conv(chatty)
    assert result.mistake is not None and result.mistake.name == "blog_view"
    out = capsys.readouterr().out
    assert out.count("shape of x:") == 2  # cases 1 and 2, not the runs that recognise the mistake
    assert out.endswith(result.report + "\n")


def test_deterministic_and_fast() -> None:
    check_dynamic_conv(right)  # warm up torch
    start = time.perf_counter()
    first = check_dynamic_conv(width_first)
    second = check_dynamic_conv(right)
    assert time.perf_counter() - start < 2.0  # well under a second each on a CPU
    assert check_dynamic_conv(width_first).report == first.report and second


def test_it_leaves_torchs_random_state_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    check_dynamic_conv(right)
    check_attention(attention_right)
    assert torch.equal(torch.rand(3), expected)


def headings(chapter: int) -> list:
    (path,) = ROOT.glob(f"book/{chapter:02d}_*.ipynb")
    cells = json.loads(path.read_text())["cells"]
    lines = [line for c in cells if c["cell_type"] == "markdown" for line in "".join(c["source"]).splitlines()]
    return [line.lstrip("#").strip() for line in lines if line.startswith("#")]


@pytest.mark.parametrize("mistake", CONV_MISTAKES + ATTENTION_MISTAKES + (CUT_FROM_GRAPH,), ids=lambda m: m.name)
def test_each_mistake_names_a_section_of_the_book(mistake: checker.Mistake) -> None:
    titles = headings(mistake.chapter)
    assert titles[0] == checker._CHAPTERS[mistake.chapter]
    assert mistake.section in titles[1:], (mistake.section, titles)


def test_it_runs_in_a_plain_python_session() -> None:
    script = ("from dyconv_teach.teaching.checker import check_dynamic_conv\n"
              "from dyconv_teach.reference import blog_dynamic_conv2d\n"
              "import sys\n"
              "result = check_dynamic_conv(blog_dynamic_conv2d)\n"
              "assert not {'matplotlib', 'ipywidgets'} & set(sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.startswith("blog_dynamic_conv2d fails case 2 of 9: two samples (B = 2, K = 5).")
    assert "Likely mistake: the blog post's" in done.stdout


@pytest.mark.parametrize("off", [torch.no_grad, torch.inference_mode])
def test_checks_gradients_where_the_caller_turned_autograd_off(off: Callable[[], Any]) -> None:
    """A chapter that runs under torch.set_grad_enabled(False) can still check a reader's function."""
    with off():
        assert check_dynamic_conv(dynamic_conv2d)
        assert not check_dynamic_conv(detached)
