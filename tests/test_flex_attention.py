"""``attn_implementation="flex_attention"`` (:func:`hf_txl.kernels_txl.flex_rel_attention`) equals the eager
reference: logits, loss, gradients and the logits of greedy generation, with memory, ``same_length``, ``clamp_len``,
``untie_r`` and left-padded batches; and each way of selecting it reaches torch's ``flex_attention``.

torch's flex_attention has no backward on the CPU: there, attention that needs gradients runs the eager reference
(tested), and the flex gradients themselves are checked by lifting torch's CPU guard, which leaves its (device
independent) unfused reference implementation to differentiate.
"""

import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex
from conftest import eager_and_fast, left_padding, tiny_config

import hf_txl.kernels_txl as kernels
from hf_txl import TxlForCausalLM
from hf_txl.kernels_txl import flex_rel_attention
from hf_txl.modeling_txl import eager_rel_attention

# Outside torch.compile flex_attention says once that it runs unfused: expected on the CPU.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

CASES = [  # (pre_lnorm, same_length, clamp_len, untie_r, padded)
    (False, False, -1, True, False),
    (True, False, 3, False, False),
    (False, True, -1, False, False),
    (False, True, 2, True, True),
    (True, False, -1, False, True),
]


@pytest.fixture
def flex_calls(monkeypatch):
    """Counts the calls of torch's flex_attention (hf_txl imports it at each call)."""
    calls = []
    original = torch_flex.flex_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch_flex, "flex_attention", spy)
    return calls


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """Let flex_attention differentiate on the CPU: torch refuses inputs that require gradients there (its unfused
    reference would handle them), and hf_txl falls back to eager for them."""
    monkeypatch.setattr(torch_flex, "_validate_device", lambda *tensors: None)
    monkeypatch.setattr(kernels, "FLEX_NO_BACKWARD_DEVICES", ())


def pair(**overrides):
    """The same weights with the eager reference and with flex_attention."""
    return eager_and_fast("flex_attention", **overrides)


def segments(model, ids, mask, length):
    """Logits and losses of ``ids`` fed in segments of ``length`` with the memory (the mask covers segment 0)."""
    cache, outputs = None, []
    for start in range(0, ids.shape[1], length):
        chunk = ids[:, start : start + length]
        out = model(chunk, cache=cache, attention_mask=mask if start == 0 else None, labels=chunk)
        cache = out.cache
        outputs.append((out.logits, out.loss))
    return outputs


# ----------------------------------------------------------------------------------------------------
# The attention function against eager
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qlen,mask_batch", [(5, 2), (5, 1), (1, 2), (1, 0)])
def test_flex_function_matches_eager(qlen, mask_batch, flex_calls):
    batch, n_head, mlen, d_head = 2, 3, 4, 8
    klen = mlen + qlen
    query = torch.randn(batch, n_head, qlen, d_head)
    key, value = torch.randn(2, batch, n_head, klen, d_head).unbind(0)
    position_head = torch.randn(n_head, klen, d_head)
    u, v = torch.randn(2, n_head, d_head).unbind(0)
    allowed = None  # mask_batch 0: every key
    if mask_batch:
        allowed = torch.rand(mask_batch, qlen, klen) > 0.4
        allowed[..., mlen : mlen + qlen] |= torch.eye(qlen, dtype=torch.bool)  # no empty row
    module = torch.nn.Module()
    args = (module, query, key, value, position_head, allowed)
    expected, _ = eager_rel_attention(*args, u=u, v=v, scaling=0.3)
    out, probs = flex_rel_attention(*args, u=u, v=v, scaling=0.3)
    assert probs is None and len(flex_calls) == 1
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_flex_function_with_gradients_on_the_cpu_runs_the_reference_it_is_given(flex_calls):
    batch, n_head, qlen, d_head = 2, 3, 4, 8
    query = torch.randn(batch, n_head, qlen, d_head, requires_grad=True)
    key, value = torch.randn(2, batch, n_head, qlen, d_head).unbind(0)
    position_head = torch.randn(n_head, qlen, d_head)
    u, v = torch.randn(2, n_head, d_head).unbind(0)
    args = (torch.nn.Module(), query, key, value, position_head, None)
    out, probs = flex_rel_attention(*args, u=u, v=v, scaling=0.3, reference=eager_rel_attention)
    expected, expected_probs = eager_rel_attention(*args, u=u, v=v, scaling=0.3)
    assert not flex_calls and torch.equal(out, expected) and torch.equal(probs, expected_probs)
    with pytest.raises(ValueError, match="no backward pass on cpu: pass the eager reference"):
        flex_rel_attention(*args, u=u, v=v, scaling=0.3)


# ----------------------------------------------------------------------------------------------------
# The model against eager
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pre_lnorm,same_length,clamp_len,untie_r,padded", CASES)
def test_flex_matches_eager_logits_and_loss_over_segments(
    pre_lnorm, same_length, clamp_len, untie_r, padded, flex_calls
):
    eager, flex = pair(mem_len=6, pre_lnorm=pre_lnorm, same_length=same_length, clamp_len=clamp_len, untie_r=untie_r)
    ids = torch.randint(1, 40, (2, 15))
    mask = left_padding(2, 5, 3) if padded else None
    with torch.no_grad():
        expected = segments(eager.eval(), ids, mask, 5)  # three segments: the memory fills, then slides
        got = segments(flex.eval(), ids, mask, 5)
    assert len(flex_calls) == 3 * flex.config.n_layer
    for (logits_e, loss_e), (logits_f, loss_f) in zip(expected, got):
        torch.testing.assert_close(logits_f, logits_e, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loss_f, loss_e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pre_lnorm,same_length,clamp_len,untie_r,padded", [CASES[0], CASES[1], CASES[3]])
def test_flex_gradients_match_eager(
    pre_lnorm, same_length, clamp_len, untie_r, padded, flex_calls, flex_backward_on_cpu
):
    eager, flex = pair(mem_len=6, pre_lnorm=pre_lnorm, same_length=same_length, clamp_len=clamp_len, untie_r=untie_r)
    ids = torch.randint(1, 40, (2, 10))
    mask = left_padding(2, 5, 3) if padded else None
    grads = []
    for model in (eager, flex):
        model.train()
        first = model(ids[:, :5], attention_mask=mask, labels=ids[:, :5])  # a graph through the first segment too
        second = model(ids[:, 5:], mems=first.mems, labels=ids[:, 5:])
        (first.loss + second.loss).backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert len(flex_calls) == 2 * flex.config.n_layer
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_flex_with_gradients_on_the_cpu_runs_eager_with_the_same_gradients(flex_calls):
    eager, flex = pair(mem_len=6, untie_r=False)
    ids = torch.randint(1, 40, (2, 6))
    grads = []
    for model in (eager, flex):
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    assert not flex_calls  # torch's flex_attention refuses inputs that require gradients on the CPU
    for expected, got in zip(*grads):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_compiled_flex_on_the_cpu_runs_sdpa_with_the_same_outputs(flex_calls, caplog):
    """torch.compile cannot lower this flex_attention on the CPU (no kernel choice for a score_mod reading BD): a
    compiled flex model there runs the SDPA implementation, with a warning, and computes what eager does."""
    torch._dynamo.reset()
    eager, flex = pair(mem_len=6, clamp_len=3)
    ids = torch.randint(1, 40, (2, 15))
    mask = left_padding(2, 5, 3)
    compiled = torch.compile(flex.eval(), dynamic=False)
    with torch.no_grad(), caplog.at_level("WARNING"):
        expected = segments(eager.eval(), ids, mask, 5)
        got = segments(compiled, ids, mask, 5)
    assert not flex_calls
    assert "compiled model runs the SDPA implementation" in caplog.text
    for (logits_e, loss_e), (logits_f, loss_f) in zip(expected, got):
        torch.testing.assert_close(logits_f, logits_e, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loss_f, loss_e, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("padded", [False, True])
def test_flex_greedy_generation_logits_equal_eager(padded, flex_calls):
    """Every step's logits, on weights where the memory changes them by units (init_std 0.5)."""
    eager, flex = pair(mem_len=8, same_length=padded, init_std=0.5)
    prompt = torch.randint(1, 40, (2, 5))
    mask = left_padding(2, 5, 2) if padded else None
    kwargs = dict(max_new_tokens=12, do_sample=False, attention_mask=mask, pad_token_id=0)
    kwargs.update(output_logits=True, return_dict_in_generate=True)
    expected = eager.eval().generate(prompt, **kwargs)
    got = flex.eval().generate(prompt, **kwargs)
    assert len(flex_calls) == 12 * flex.config.n_layer  # the prompt, then one call per new token
    assert torch.equal(got.sequences, expected.sequences)
    # logits of size ~9: measured at most 2e-5 apart (8 cases); the memory moves them by more than 2
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=1e-4, rtol=0)
    with torch.no_grad():
        alone = eager(expected.sequences[:, -2:-1]).logits[:, -1]  # the last step's input without the memory
    assert ((alone - expected.logits[-1]).abs().amax(-1) > 1.0).all()


# ----------------------------------------------------------------------------------------------------
# What flex_attention cannot do
# ----------------------------------------------------------------------------------------------------


def test_flex_refuses_attention_dropout_in_training_only():
    _, flex = pair(dropatt=0.1)
    ids = torch.randint(1, 40, (1, 4))
    with pytest.raises(ValueError, match="dropatt=0.1"):
        flex.train()(ids)
    with torch.no_grad():
        flex.eval()(ids)  # no attention dropout in evaluation


def test_output_attentions_uses_eager_under_flex(flex_calls):
    eager, flex = pair()
    ids = torch.randint(1, 40, (1, 4))
    with torch.no_grad():
        got = flex.eval()(ids, output_attentions=True)
        expected = eager.eval()(ids, output_attentions=True)
    assert not flex_calls and len(got.attentions) == flex.config.n_layer
    torch.testing.assert_close(got.attentions[0], expected.attentions[0])


# ----------------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------------


def count_flex_calls(model, calls) -> int:
    before = len(calls)
    with torch.no_grad():
        model.eval()(torch.randint(1, 40, (1, 4)))
    return len(calls) - before


def test_every_way_of_selecting_flex_reaches_flex_attention(tmp_path, flex_calls):
    config = tiny_config()
    built = TxlForCausalLM._from_config(config, attn_implementation="flex_attention")
    assert built.config._attn_implementation == "flex_attention"
    assert count_flex_calls(built, flex_calls) == config.n_layer

    built.save_pretrained(tmp_path)
    loaded = TxlForCausalLM.from_pretrained(tmp_path, attn_implementation="flex_attention")
    assert loaded.config._attn_implementation == "flex_attention"
    assert count_flex_calls(loaded, flex_calls) == config.n_layer

    default = TxlForCausalLM.from_pretrained(tmp_path)
    assert default.config._attn_implementation == "sdpa" and count_flex_calls(default, flex_calls) == 0
    default.set_attn_implementation("flex_attention")
    assert default.transformer.config._attn_implementation == "flex_attention"
    assert count_flex_calls(default, flex_calls) == config.n_layer
    default.set_attn_implementation("eager")
    assert count_flex_calls(default, flex_calls) == 0
