"""``hf_txl/kernels_txl.py`` against the reference maths: the CPU dropout, the products of a few rows (and how their
form is chosen), the position term and mask of the SDPA path. The attention implementations against the eager
reference on whole models are in test_speed_paths.py and test_flex_attention.py.

Speed itself is measured in ``bench/``, never asserted here.
"""

import logging
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import eager_and_fast, tiny_config

import hf_txl.kernels_txl as kernels
from hf_txl import TxlForCausalLM
from hf_txl.kernels_txl import additive_mask, fast_dropout
from hf_txl.modeling_txl import rel_shift

AMD_EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\nflags\t\t: avx512f\n"
INTEL_XEON = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) 8488C\nflags\t\t: amx_bf16\n"
ARM = "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd sve bf16\nCPU implementer\t: 0x41\n"
WINDOWS_AMD = "AMD64 Family 25 Model 17 Stepping 1, AuthenticAMD"  # platform.processor() where there is no /proc


# ----------------------------------------------------------------------------------------------------
# Products of a few rows: the form is chosen once, from what the CPU is, with an override
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cpuinfo,override,expected",
    [
        (AMD_EPYC, None, "column"),
        (WINDOWS_AMD, None, "column"),
        (INTEL_XEON, None, "row"),
        (ARM, None, "row"),
        ("", None, "row"),
        (AMD_EPYC, "", "column"),  # empty: not set
        (AMD_EPYC, "row", "row"),
        (INTEL_XEON, "column", "column"),
        (INTEL_XEON, " Column\n", "column"),
    ],
)
def test_the_few_row_product_form_follows_the_cpu_or_the_override(cpuinfo, override, expected):
    form, reason = kernels.choose_cpu_products(cpuinfo, override)
    assert form == expected
    assert ("HF_TXL_CPU_PRODUCTS" in reason) == bool(override and override.strip())


@pytest.mark.parametrize("value", ["fast", "columns", "F.linear"])
def test_a_bad_override_is_a_one_line_error_naming_the_allowed_values(monkeypatch, value):
    with pytest.raises(ValueError) as error:
        kernels.choose_cpu_products(AMD_EPYC, value)
    message = str(error.value)
    assert "\n" not in message and f"HF_TXL_CPU_PRODUCTS={value!r}" in message
    assert "'column'" in message and "'row'" in message
    monkeypatch.setattr(kernels, "CPU_PRODUCT_FORM", None)  # not chosen yet in this process
    monkeypatch.setenv("HF_TXL_CPU_PRODUCTS", value)
    with torch.no_grad(), pytest.raises(ValueError, match="HF_TXL_CPU_PRODUCTS"):
        kernels.project(torch.nn.Linear(8, 8), torch.randn(1, 8))  # the first few-row product reads it


def test_the_form_is_chosen_once_per_process_and_logged(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "CPU_PRODUCT_FORM", None)
    monkeypatch.setattr(kernels, "read_cpuinfo", lambda: INTEL_XEON)
    monkeypatch.setenv("HF_TXL_CPU_PRODUCTS", "column")
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        assert kernels.cpu_product_form() == "column"
        monkeypatch.setenv("HF_TXL_CPU_PRODUCTS", "row")
        monkeypatch.setattr(kernels, "read_cpuinfo", lambda: AMD_EPYC)
        assert kernels.cpu_product_form() == "column"  # read once: later changes are not seen
    (record,) = [r for r in caplog.records if r.name == kernels.__name__]
    assert record.levelno == logging.INFO and "column form" in record.getMessage()
    assert "HF_TXL_CPU_PRODUCTS=column" in record.getMessage()
    monkeypatch.setattr(kernels, "CPU_PRODUCT_FORM", None)
    monkeypatch.delenv("HF_TXL_CPU_PRODUCTS")
    assert kernels.cpu_product_form() == "column"  # AMD, no override


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/cpuinfo: Linux only")
def test_cpuinfo_is_the_first_processors_block():
    text = kernels.read_cpuinfo()
    assert text.startswith("processor") and text.count("processor\t") == 1


@pytest.mark.parametrize("form", ["column", "row"])
@pytest.mark.parametrize("batch", [1, 3])
def test_generation_steps_in_either_form_equal_the_reference(monkeypatch, form, batch):
    """Greedy generation with the memory, on weights where the memory decides the logits: the fast model (few-row
    products in ``form``, SDPA with its one-query position term in ``form``) gives the logits of the reference
    (eager attention, every projection through ``nn.Linear``) to float32 rounding."""
    eager, fast = eager_and_fast("sdpa", mem_len=10, init_std=0.5, d_model=64, d_inner=128, n_head=4, d_head=16)
    eager.eval(), fast.eval()
    prompt = torch.randint(1, 40, (batch, 6))
    kwargs = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    calls, split = [], kernels.split_weight_linear
    monkeypatch.setattr(kernels, "split_weight_linear", lambda *args: calls.append(1) or split(*args))
    monkeypatch.setattr(kernels, "cpu_product_form", lambda: form)
    got = fast.generate(prompt, **kwargs)
    assert bool(calls) == (form == "column")
    monkeypatch.setattr(kernels, "FEW_ROWS", 0)  # the reference: every projection through nn.Linear
    expected = eager.generate(prompt, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    # logits of size ~12: |fast - reference| measured at most 2e-4 (6 seeds, both forms); the memory moves them by > 4
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=5e-4, rtol=0)
    last = got.sequences[:, -2:-1]  # the last step's input: alone (no memory) it gives other logits
    with torch.no_grad():
        alone = eager(last, use_cache=False).logits[:, -1]
    assert ((alone - expected.logits[-1]).abs().amax(-1) > 1.0).all()


@pytest.mark.parametrize("out_features", [48, 36, 7])  # 8, 4 and 1 weight blocks
@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_split_weight_linear_equals_linear(out_features, rows, bias):
    x = torch.randn(rows, 1, 20, dtype=torch.float64)
    weight = torch.randn(out_features, 20, dtype=torch.float64)
    b = torch.randn(out_features, dtype=torch.float64) if bias else None
    out = kernels.split_weight_linear(x, weight, b)
    assert out.shape == (rows, 1, out_features) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight, b), atol=1e-12, rtol=1e-12)
    out32 = kernels.split_weight_linear(x.float(), weight.float(), None if b is None else b.float())
    torch.testing.assert_close(out32, F.linear(x, weight, b).float(), atol=2e-5, rtol=1e-5)


def test_project_takes_the_chosen_form_only_for_few_rows_of_float32_inference(monkeypatch):
    calls = []
    real = kernels.split_weight_linear
    monkeypatch.setattr(kernels, "split_weight_linear", lambda *args: calls.append(1) or real(*args))
    monkeypatch.setattr(kernels, "cpu_product_form", lambda: "column")
    layer = torch.nn.Linear(16, 8)
    few, many = torch.randn(2, 3, 16), torch.randn(kernels.FEW_ROWS + 1, 16)

    def taken(x, module=layer) -> bool:
        calls.clear()
        out = kernels.project(module, x)
        torch.testing.assert_close(out, F.linear(x, module.weight, module.bias), atol=1e-6, rtol=1e-5)
        return bool(calls)

    with torch.no_grad():
        assert taken(few)
        assert not taken(many)
        assert not taken(few.double(), torch.nn.Linear(16, 8).double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            calls.clear()
            assert kernels.project(layer, few).dtype == torch.bfloat16 and not calls  # autocast decides
        subclass = type("MyLinear", (torch.nn.Linear,), {})(16, 8)  # e.g. an adapter or quantized layer
        assert not taken(few, subclass)
        hooked = torch.nn.Linear(16, 8)
        hooked.register_forward_hook(lambda module, args, out: None)
        assert not taken(few, hooked)
    assert not taken(few)  # gradients enabled: the layer itself (autograd)
    with torch.inference_mode():
        assert taken(few)
    monkeypatch.setattr(kernels, "cpu_product_form", lambda: "row")  # a CPU where F.linear is faster
    linear_calls, real_linear = [], F.linear
    monkeypatch.setattr(kernels.F, "linear", lambda *args: linear_calls.append(1) or real_linear(*args))
    monkeypatch.setattr(layer, "forward", None)  # the module call is skipped: F.linear directly
    calls.clear()
    with torch.no_grad():
        out = kernels.project(layer, few)
        assert linear_calls == [1] and not calls
        torch.testing.assert_close(out, real_linear(few, layer.weight, layer.bias), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 24), (1, 24), (24,)])
@pytest.mark.parametrize("bias", [True, False])
def test_one_row_linear_equals_linear(dtype, shape, bias):
    x = torch.randn(shape, dtype=torch.float64)
    weight = torch.randn(40, 24, dtype=torch.float64)
    b = torch.randn(40, dtype=torch.float64) if bias else None
    exact = F.linear(x, weight, b)
    low = (x.to(dtype), weight.to(dtype), None if b is None else b.to(dtype))
    out = kernels.one_row_linear(*low)
    assert out.shape == exact.shape and out.dtype == dtype
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]  # low-precision inputs
    torch.testing.assert_close(out.double(), exact, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(out, F.linear(*low), atol=tolerance / 10, rtol=tolerance / 10)  # F.linear's rounding


def test_project_takes_addmv_only_for_one_row_of_bf16_or_fp16_inference_without_packed_weights(monkeypatch):
    kernels.packed_form()
    monkeypatch.setattr(kernels, "PACKED_FORM", "")  # a torch without FBGEMM or oneDNN bf16 (see test_low_precision)
    calls = []
    real = kernels.one_row_linear
    monkeypatch.setattr(kernels, "one_row_linear", lambda *args: calls.append(1) or real(*args))
    layer = torch.nn.Linear(16, 8).bfloat16()

    def taken(x, module=layer) -> bool:
        calls.clear()
        out = kernels.project(module, x)
        assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], 8)
        reference = F.linear(x.float(), module.weight.float(), module.bias.float()).to(x.dtype)
        torch.testing.assert_close(out, reference, atol=5e-2, rtol=2e-2)
        return bool(calls)

    one, three = torch.randn(1, 1, 16).bfloat16(), torch.randn(3, 1, 16).bfloat16()
    with torch.no_grad():
        assert taken(one)
        assert taken(one.half(), torch.nn.Linear(16, 8).half())
        assert not taken(three)  # several rows: the matrix product
        assert not taken(one.float(), torch.nn.Linear(16, 8))  # float32 has its own choice (cpu_product_form)
        with pytest.raises(RuntimeError, match="same dtype"):  # mixed dtypes: the layer decides (and raises)
            kernels.project(torch.nn.Linear(16, 8), one)
        assert not calls
    assert not taken(one)  # gradients enabled: the layer itself (autograd)


def test_bf16_generation_with_one_row_products_equals_the_layers_products(monkeypatch):
    kernels.packed_form()
    monkeypatch.setattr(kernels, "PACKED_FORM", "")  # without packed weights (those: test_low_precision)
    model = TxlForCausalLM(tiny_config()).eval().to(torch.bfloat16)
    prompt = torch.randint(1, 40, (1, 9))
    calls, real = [], kernels.one_row_linear
    monkeypatch.setattr(kernels, "one_row_linear", lambda *args: calls.append(1) or real(*args))
    kwargs = dict(max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True)
    fast = model.generate(prompt, **kwargs)
    assert len(calls) >= 11 * 2 * 4  # every step after the prompt: 4 projections per layer (qkv, o, fc_in, fc_out)
    monkeypatch.setattr(kernels, "one_row_linear", lambda x, weight, bias: F.linear(x, weight, bias))
    reference = model.generate(prompt, **kwargs)
    assert torch.equal(fast.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(fast.scores), torch.stack(reference.scores), atol=5e-2, rtol=2e-2)


# ----------------------------------------------------------------------------------------------------
# Position term and mask of the SDPA path
# ----------------------------------------------------------------------------------------------------


def test_shifted_view_equals_rel_shift_and_has_its_gradient():
    x = torch.randn(2, 3, 4, 7, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(kernels._shifted_view(F.pad(x, (1, 0))), rel_shift(x), atol=0, rtol=0)
    assert torch.autograd.gradcheck(lambda t: kernels._shifted_view(F.pad(t, (1, 0))), (x,))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("head_major", [True, False])
def test_one_query_position_scores_equal_the_formula(batch, head_major):
    n_head, klen, d_head = 4, 9, 8
    query = torch.randn(batch, n_head, 1, d_head, dtype=torch.float64)
    v = torch.randn(n_head, d_head, dtype=torch.float64)
    projected = torch.randn(klen, n_head * d_head, dtype=torch.float64)  # W_{k,R} R as r_proj returns it
    position_head = projected.view(klen, n_head, d_head).transpose(0, 1)  # [H, K, D], a strided view
    if head_major:
        position_head = position_head.contiguous()  # as the inference cache keeps it
    expected = torch.einsum("bhd,khd->bhk", query[:, :, 0] + v, projected.view(klen, n_head, d_head)) * 0.3
    out = kernels.scaled_position_scores(query, position_head, v, 0.3)
    assert out.shape == (batch, n_head, 1, klen)
    torch.testing.assert_close(out[:, :, 0], expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("form", ["column", "row"])
@pytest.mark.parametrize("batch", [1, 3])
def test_one_query_position_scores_take_either_product_form_in_float32(monkeypatch, form, batch):
    monkeypatch.setattr(kernels, "cpu_product_form", lambda: form)
    n_head, klen, d_head = 4, 9, 8
    query = torch.randn(batch, n_head, 1, d_head)
    v = torch.randn(n_head, d_head)
    position_head = torch.randn(n_head, klen, d_head)  # [H, K, D], head-major as the inference cache keeps it
    expected = torch.einsum("bhd,hkd->bhk", query[:, :, 0].double() + v.double(), position_head.double()) * 0.3
    out = kernels.scaled_position_scores(query, position_head, v, 0.3)
    assert out.shape == (batch, n_head, 1, klen) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, :, 0].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_additive_mask_equals_masked_fill_after_the_addition(dtype):
    allowed = torch.rand(2, 1, 6, 9) > 0.4
    bias = additive_mask(allowed, dtype)
    lowest = torch.finfo(dtype).min
    assert bias.dtype == dtype and torch.equal(bias, torch.zeros((), dtype=dtype).masked_fill(~allowed, lowest))
    scores = (torch.randn(2, 3, 6, 9) * 8).to(dtype)  # broadcast over heads, as in sdpa_rel_attention
    masked = scores.masked_fill(~allowed, lowest)
    added = scores + bias
    assert torch.equal(added[allowed.expand_as(scores)], masked[allowed.expand_as(scores)])
    hidden = added[~allowed.expand_as(scores)]
    assert bool((hidden < lowest / 2).all())  # finfo.min, or within a few scores of it in float16
    torch.testing.assert_close(added.float().softmax(-1), masked.float().softmax(-1), rtol=0, atol=0)
    non_contiguous = allowed.transpose(-1, -2)  # the byte view works on any strides
    assert torch.equal(additive_mask(non_contiguous, dtype), bias.transpose(-1, -2))


# ----------------------------------------------------------------------------------------------------
# Fast dropout (CPU) == inverted dropout
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_fast_dropout_keeps_each_element_independently_with_probability_one_minus_p(p):
    x = torch.rand(1000, 1000) + 0.5  # no zeros: a zero output means dropped
    out = fast_dropout(x, p, training=True)
    keep = out != 0
    n = keep.numel()
    threshold = round(p * 65536)
    keep_prob = 1 - threshold / 65536
    sigma = math.sqrt(keep_prob * (1 - keep_prob) / n)
    assert abs(keep.float().mean().item() - keep_prob) < 5 * sigma
    # kept values are scaled by 1 / P(keep), so the expectation is unchanged
    torch.testing.assert_close(out[keep], x[keep] / keep_prob, rtol=1e-6, atol=0)
    # independence: neighbours (the 16-bit pieces of one random word) are both kept with probability keep_prob^2
    both = (keep[:, :-1] & keep[:, 1:]).float().mean().item()
    assert abs(both - keep_prob**2) < 0.01
    rows = (keep[:-1] & keep[1:]).float().mean().item()
    assert abs(rows - keep_prob**2) < 0.01


def fast_dropout_seeded(x, p):
    torch.manual_seed(7)  # the same mask at every call, so gradcheck's finite differences see one function
    return fast_dropout(x, p, training=True)


def test_fast_dropout_gradient_is_the_same_mask_and_scale():
    torch.manual_seed(1)
    x = (torch.rand(64, 33, dtype=torch.float64) + 0.5).requires_grad_()
    out = fast_dropout(x, 0.3, training=True)
    grad = torch.randn_like(out)
    out.backward(grad)
    scale = out.detach() / x.detach()  # 0 where dropped, 1 / P(keep) where kept
    torch.testing.assert_close(x.grad, grad * scale)
    small = x.detach()[:6, :5].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fast_dropout_seeded(t, 0.3), (small,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fast_dropout_equals_the_bool_mask_form_of_the_same_random_words(dtype):
    """The uint8 mask and addcmul give exactly what comparing the words into bool and ``where`` give."""
    x = torch.randn(5, 7, 9, dtype=dtype)
    torch.manual_seed(11)
    out = fast_dropout(x, 0.25, training=True)
    torch.manual_seed(11)
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
    threshold = round(0.25 * 65536)
    keep = words.view(torch.int16)[: x.numel()].view(x.shape) >= threshold - 32768
    expected = torch.where(keep, x, torch.zeros((), dtype=dtype)).mul_(65536 / (65536 - threshold))
    assert out.dtype == dtype and torch.equal(out, expected)


def test_fast_dropout_is_seeded_and_a_no_op_when_off():
    x = torch.randn(4, 50, 16)
    torch.manual_seed(3)
    a = fast_dropout(x, 0.2, training=True)
    torch.manual_seed(3)
    b = fast_dropout(x, 0.2, training=True)
    c = fast_dropout(x, 0.2, training=True)
    assert torch.equal(a, b) and not torch.equal(b, c)
    assert fast_dropout(x, 0.2, training=False) is x and fast_dropout(x, 0.0, training=True) is x
    assert torch.equal(fast_dropout(x, 1.0, training=True), torch.zeros_like(x))
    low = fast_dropout(x.bfloat16(), 0.2, training=True)
    assert low.dtype == torch.bfloat16 and ((low == 0).float().mean() - 0.2).abs() < 0.05


def test_each_attention_implementation_has_its_dropout():
    assert kernels.dropout_function("sdpa") is fast_dropout
    assert kernels.dropout_function("eager") is F.dropout and kernels.dropout_function("flex_attention") is F.dropout
