"""Generation with bf16 weights and with int8 weight-only quantization (torchao through ``TorchAoConfig``): every fast
path of ``kernels_txl.py`` against its reference.

* bf16 products of a few rows through a packed copy of the weight (``packed_linear``: FBGEMM's float16-weight
  product, or oneDNN's) against ``F.linear``;
* int8 weight-only products through ``torch._weight_int8pack_mm`` (``int8_weight_linear``) against the dequantized
  weights, with the kernel's roundings and without them;
* the float32 projection cache of a bf16 model on the CPU (``inference_projection_dtype``) against the eager bf16
  reference; whole models through ``generate()`` on weights where the memory decides the logits.

Speed is measured in ``bench/bench_speed.py`` (section ``precision``), never here.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_context_matters, tiny_config

import hf_txl.kernels_txl as kernels
from hf_txl import TxlForCausalLM

BF16_STEP = 2.0**-7  # the spacing of bf16 numbers in [1, 2): one rounding moves a value by at most half of it


def available_packed_forms() -> list[str]:
    """The packed bf16 forms this torch has (``packed_form`` picks the first)."""
    forms = []
    if kernels.packed_form() == "fbgemm":
        forms.append("fbgemm")
    if kernels.onednn_bf16_supported():
        forms.append("onednn")
    return forms


@pytest.fixture
def packed_form(request, monkeypatch):
    """Runs the test with ``PACKED_FORM`` set to the parameter (the process's choice is restored afterwards)."""
    kernels.packed_form()
    monkeypatch.setattr(kernels, "PACKED_FORM", request.param)
    return request.param


def count_calls(monkeypatch, name: str) -> list:
    calls, real = [], getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *args: calls.append(1) or real(*args))
    return calls


# ----------------------------------------------------------------------------------------------------
# bf16: packed weights
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("packed_form", available_packed_forms(), indirect=True)
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_linear(packed_form, rows, bias):
    layer = torch.nn.Linear(96, 40, bias=bias).bfloat16()
    x = torch.randn(rows, 1, 96).bfloat16()
    with torch.no_grad():
        packed = kernels.packed_weight(layer)
        assert packed[0] == packed_form
        out = kernels.packed_linear(x, packed, layer.bias)
        reference = F.linear(x, layer.weight, layer.bias)
        exact = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    assert out.shape == reference.shape == (rows, 1, 40) and out.dtype == torch.bfloat16
    # float32 sums rounded once to bf16: within one bf16 step of F.linear's (another summation order), within half a
    # step of the exact sum
    torch.testing.assert_close(out.float(), reference.float(), rtol=BF16_STEP, atol=1e-5)
    torch.testing.assert_close(out.double(), exact, rtol=BF16_STEP / 2 + 1e-6, atol=1e-6)


def test_fbgemm_form_keeps_tiny_weights_within_3e_8_and_refuses_weights_beyond_float16(monkeypatch):
    if kernels.packed_form() != "fbgemm":
        pytest.skip("this torch has no FBGEMM float16 product (its x86 builds do)")
    layer = torch.nn.Linear(64, 16, bias=False).bfloat16()
    with torch.no_grad():
        layer.weight[:, :8] = torch.randn(16, 8).bfloat16() * 2e-6  # below 2^-17: float16 subnormals round them
        x = torch.randn(1, 64).bfloat16()
        out = kernels.project(layer, x)
        exact = F.linear(x.double(), layer.weight.double())
    assert kernels.packed_weight(layer)[0] == "fbgemm"
    torch.testing.assert_close(out.double(), exact, rtol=BF16_STEP / 2, atol=64 * 3e-8)
    with torch.no_grad():
        layer.weight[0, 0] = 1e5  # beyond float16: that weight would become inf
        out = kernels.project(layer, x)
        reference = F.linear(x, layer.weight)
    assert kernels.packed_weight(layer) is None or kernels.packed_weight(layer)[0] != "fbgemm"
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference.float(), rtol=BF16_STEP, atol=1e-3)


def test_packed_weight_follows_the_weight_and_is_never_saved_or_copied():
    layer = torch.nn.Linear(32, 16).bfloat16()
    x = torch.randn(1, 32).bfloat16()
    if kernels.packed_form() == "":
        pytest.skip("no packed bf16 form in this torch")
    with torch.no_grad():
        kernels.project(layer, x)
        assert kernels.FAST_WEIGHT_ATTRIBUTE in layer.__dict__
        assert not any("fast" in name for name in layer.state_dict())
        twin = copy.deepcopy(layer)  # a oneDNN packed tensor cannot be copied: the copy packs its own
        assert twin.__dict__[kernels.FAST_WEIGHT_ATTRIBUTE] is None
        torch.testing.assert_close(kernels.project(twin, x), kernels.project(layer, x), rtol=0, atol=0)
        layer.weight.mul_(-1)  # in place: the version changes
        torch.testing.assert_close(kernels.project(layer, x).float(), F.linear(x, layer.weight, layer.bias).float(),
                                   rtol=BF16_STEP, atol=1e-5)  # fmt: skip
        layer.weight = torch.nn.Parameter(torch.randn(16, 32).bfloat16())  # a new tensor
        torch.testing.assert_close(kernels.project(layer, x).float(), F.linear(x, layer.weight, layer.bias).float(),
                                   rtol=BF16_STEP, atol=1e-5)  # fmt: skip


def test_project_takes_packed_weights_only_for_few_rows_of_bf16_inference(monkeypatch):
    if kernels.packed_form() == "":
        pytest.skip("no packed bf16 form in this torch")
    calls = count_calls(monkeypatch, "packed_linear")
    layer = torch.nn.Linear(16, 8).bfloat16()

    def taken(x) -> bool:
        calls.clear()
        out = kernels.project(layer, x)
        torch.testing.assert_close(out.float(), F.linear(x, layer.weight, layer.bias).float(), rtol=BF16_STEP,
                                   atol=1e-5)  # fmt: skip
        return bool(calls)

    with torch.no_grad():
        assert taken(torch.randn(1, 1, 16).bfloat16())
        assert taken(torch.randn(kernels.PACKED_ROWS, 16).bfloat16())
        assert not taken(torch.randn(kernels.PACKED_ROWS + 1, 16).bfloat16())
    assert not taken(torch.randn(1, 16).bfloat16())  # gradients enabled: the layer itself (autograd)


# ----------------------------------------------------------------------------------------------------
# int8 weight-only (torchao)
# ----------------------------------------------------------------------------------------------------


def int8_linear(in_features=96, out_features=40, bias=True, dtype=torch.float32):
    """An nn.Linear quantized by torchao as ``TorchAoConfig(Int8WeightOnlyConfig())`` does, and its float copy."""
    quantization = pytest.importorskip("torchao.quantization", reason="int8 needs torchao (hf_txl[quantization])")
    float_layer = torch.nn.Linear(in_features, out_features, bias=bias).to(dtype)
    layer = copy.deepcopy(float_layer)
    holder = torch.nn.Sequential(layer)
    quantization.quantize_(holder, quantization.Int8WeightOnlyConfig())
    return holder[0], float_layer


def dequantized(layer) -> torch.Tensor:
    weight = layer.weight
    return weight.qdata.double() * weight.scale.double().reshape(-1, 1)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_int8_weight_linear_equals_the_dequantized_reference(rows, bias, dtype):
    layer, float_layer = int8_linear(bias=bias, dtype=dtype)
    x = torch.randn(rows, 1, 96).to(dtype)
    parts = kernels.int8_weight_parts(layer)
    assert parts is not None
    out = kernels.int8_weight_linear(x, *parts, layer.bias)
    assert out.shape == (rows, 1, 40) and out.dtype == dtype
    bias64 = None if layer.bias is None else layer.bias.double()
    # With the kernel's roundings (input and scales to bf16, the float32 sum rounded once to bf16, the bias added in
    # x's dtype): equal up to the summation order
    q, scale = layer.weight.qdata.double(), layer.weight.scale.bfloat16().double().reshape(-1, 1)
    rounded = F.linear(x.bfloat16().double(), q * scale).bfloat16().to(dtype)
    rounded = (rounded if layer.bias is None else rounded + layer.bias).double()
    torch.testing.assert_close(out.double(), rounded, rtol=BF16_STEP, atol=1e-5)
    # Against the exact product with the dequantized weights (torchao's own path): the bf16 roundings only
    exact = F.linear(x.double(), dequantized(layer), bias64)
    largest = exact.abs().max().item()
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=2 * BF16_STEP * largest)
    torch.testing.assert_close(layer(x).double(), exact, rtol=0, atol=(1e-5 if dtype == torch.float32 else BF16_STEP)
                               * largest)  # fmt: skip
    # And the cost of int8 itself, against the float weights (a per-row step of max|w| / 127)
    float_out = F.linear(x.double(), float_layer.weight.double(), bias64)
    assert (out.double() - float_out).abs().max() < 0.05 * largest


def test_project_takes_the_int8_kernel_only_for_few_rows_without_gradients(monkeypatch):
    layer, _ = int8_linear()
    calls = count_calls(monkeypatch, "int8_weight_linear")
    with torch.no_grad():
        kernels.project(layer, torch.randn(1, 1, 96))
        assert calls == [1]
        kernels.project(layer, torch.randn(kernels.FEW_ROWS + 1, 96))  # a prompt: torchao's own path
        assert calls == [1]
    kernels.project(layer, torch.randn(1, 96, requires_grad=True))
    assert calls == [1]


def test_int8_kernel_leaves_other_quantized_formats_to_torchao():
    layer, _ = int8_linear()
    with torch.no_grad():
        layer.weight.zero_point.fill_(3)  # an asymmetric weight: the kernel has no zero point
        assert kernels.int8_weight_parts(layer) is None
        x = torch.randn(1, 96)
        torch.testing.assert_close(kernels.project(layer, x), layer(x), rtol=0, atol=0)
    plain = torch.nn.Linear(8, 4)
    assert kernels.int8_weight_parts(plain) is None


# ----------------------------------------------------------------------------------------------------
# Whole models through generate()
# ----------------------------------------------------------------------------------------------------


def context_model(**overrides) -> TxlForCausalLM:
    """A tiny model whose logits depend on the memory, in eval mode. init_std 0.2: the context moves the last logits
    by more than 3 (asserted > 2 by the tests), while bf16 roundings move them by less than 0.1 (at 0.5 the network
    is chaotic: bf16 roundings alone change greedy tokens)."""
    config = tiny_config(init_std=0.2, mem_len=12, d_model=64, d_inner=128, n_head=4, d_head=16, **overrides)
    return TxlForCausalLM(config).eval()


LOGIT_TOLERANCE = 0.3  # bf16 roundings in other places: measured at most 0.09 (3 seeds); the memory moves them by > 2


GENERATE = dict(max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)


def test_bf16_generation_equals_the_eager_bf16_reference(monkeypatch):
    """The fast bf16 model (packed products, float32 projection cache, SDPA) against the reference (every product
    through nn.Linear, eager attention, bf16 cache): same tokens, logits within bf16 rounding."""
    fast = context_model().to(torch.bfloat16)
    reference = copy.deepcopy(fast)
    reference.config._attn_implementation = "eager"
    prompt = torch.randint(1, 40, (2, 7))
    assert_context_matters(fast, prompt, min_change=2.0)
    calls = count_calls(monkeypatch, "packed_linear")
    got = fast.generate(prompt, **GENERATE)
    with torch.no_grad():
        assert fast(prompt, use_cache=True).cache.store.kv[0].dtype == torch.float32  # the projections, exactly
    if kernels.packed_form():
        assert len(calls) >= 9 * 2 * 4  # every step after the prompt: qkv, o, fc_in, fc_out in both layers
    monkeypatch.setattr(kernels, "FEW_ROWS", 0)  # the reference: every projection through nn.Linear
    expected = reference.generate(prompt, **GENERATE)
    with torch.no_grad():
        assert reference(prompt, use_cache=True).cache.store.kv[0].dtype == torch.bfloat16
    assert torch.equal(got.sequences, expected.sequences)
    got_logits, expected_logits = torch.stack(got.logits).float(), torch.stack(expected.logits).float()
    torch.testing.assert_close(got_logits, expected_logits, rtol=0, atol=LOGIT_TOLERANCE)


def test_bf16_cache_in_float32_serves_eager_attention_too():
    model = context_model().to(torch.bfloat16)
    prompt = torch.randint(1, 40, (1, 7))
    with torch.no_grad():
        first, second = model(prompt, use_cache=True).cache, model(prompt, use_cache=True).cache
        assert first.store.kv[0].dtype == torch.float32
        step = model(prompt[:, -1:], cache=first, output_attentions=True)  # eager attention on the float32 cache
        again = model(prompt[:, -1:], cache=second)  # SDPA
    assert step.attentions[0].shape == (1, 4, 1, 8)
    torch.testing.assert_close(step.logits.float(), again.logits.float(), rtol=0, atol=LOGIT_TOLERANCE)


def save_and_quantize(model, tmp_path):
    pytest.importorskip("torchao.quantization", reason="int8 needs torchao (hf_txl[quantization])")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    model.save_pretrained(tmp_path)
    quantization_config = TorchAoConfig(Int8WeightOnlyConfig())
    return AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization_config).eval()


def test_int8_generation_equals_torchaos_own_products(tmp_path, monkeypatch):
    """An int8 model loaded with TorchAoConfig: generate() through the int8 kernel against torchao's own products
    (dequantized weights) on weights where the memory matters; and the cost of int8 against the float32 model."""
    model = context_model()
    quantized = save_and_quantize(model, tmp_path)
    assert type(quantized.transformer.layers[0].ff.fc_in.weight).__name__ == "Int8Tensor"
    prompt = torch.randint(1, 40, (2, 7))
    assert_context_matters(quantized, prompt, min_change=2.0)
    calls = count_calls(monkeypatch, "int8_weight_linear")
    got = quantized.generate(prompt, **GENERATE)
    assert len(calls) >= 9 * 2 * 4
    monkeypatch.setattr(kernels, "int8_weight_parts", lambda layer: None)  # torchao's path for every product
    expected = quantized.generate(prompt, **GENERATE)
    assert torch.equal(got.sequences, expected.sequences)
    # the kernel rounds inputs and sums to bf16 (torchao computes in float32)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=0, atol=LOGIT_TOLERANCE)
    # int8 against float32 weights, the same tokens fed to both: log-probabilities within 0.1 nats on average
    with torch.no_grad():
        log_p = torch.log_softmax(model(got.sequences).logits, -1)
        log_p_int8 = torch.log_softmax(quantized(got.sequences).logits, -1)
    assert (log_p - log_p_int8).abs().mean() < 0.1


def test_a_trainable_bias_keeps_the_layers_own_product(monkeypatch):
    """A frozen weight with a trainable bias (e.g. bias-only fine-tuning) under autograd: the layer itself computes
    (oneDNN's packed product falls to a path 300x slower when its bias needs a gradient), and the bias gets its
    gradient."""
    calls = count_calls(monkeypatch, "packed_linear")
    layer = torch.nn.Linear(16, 8).bfloat16()
    layer.weight.requires_grad_(False)
    x = torch.randn(1, 16).bfloat16()
    kernels.project(layer, x).float().sum().backward()
    assert not calls
    assert torch.equal(layer.bias.grad, torch.ones(8, dtype=torch.bfloat16))
