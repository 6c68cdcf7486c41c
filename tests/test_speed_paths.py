"""Fast paths equal the reference: the fused attention (``sdpa``) against the eager reference, and the inference
caches of :class:`TxlCache` (projected memory keys/values, projected position terms) against recomputation.

Speed itself is measured in ``bench/``, never asserted here.
"""

import copy
import json
import math
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import eager_and_fast, left_padding, tiny_config

from hf_txl import TxlCache, TxlForCausalLM
from hf_txl.cache_txl import MemoryStore
from hf_txl.modeling_txl import (
    TxlModel,
    additive_mask,
    causal_memory_mask,
    fast_dropout,
    sees_every_key,
    sinusoid_position_embedding,
)

CASES = [  # (pre_lnorm, same_length, clamp_len, untie_r, padded)
    (False, False, -1, True, False),
    (True, False, 3, False, False),
    (False, True, 2, True, True),
    (True, True, -1, False, True),
]


def pair(**overrides):
    """The same weights with the eager reference and with the fast path."""
    return eager_and_fast("sdpa", **overrides)


def no_cache(model):
    """Turn the inference caches off for one model (the uncached reference)."""
    getattr(model, "transformer", model)._inference_cache_key = lambda hidden: None
    return model


# ----------------------------------------------------------------------------------------------------
# Fused attention == eager reference
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pre_lnorm,same_length,clamp_len,untie_r,padded", CASES)
def test_fused_attention_matches_eager_outputs_and_gradients(pre_lnorm, same_length, clamp_len, untie_r, padded):
    eager, fast = pair(mem_len=5, pre_lnorm=pre_lnorm, same_length=same_length, clamp_len=clamp_len, untie_r=untie_r)
    ids = torch.randint(1, 40, (2, 14))
    mask = left_padding(2, 7, 3) if padded else None
    results = []
    for model in (eager, fast):
        model.train()
        first = model(ids[:, :7], attention_mask=mask)  # fills the memory (with padding when `padded`)
        second = model(ids[:, 7:], mems=first.mems, labels=ids[:, 7:])
        second.loss.backward()
        results.append(
            (first.logits.detach(), second.logits.detach(), {n: p.grad for n, p in model.named_parameters()})
        )
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-5)
    for name, grad in results[0][2].items():
        assert grad is not None, name
        torch.testing.assert_close(grad, results[1][2][name], atol=1e-5, rtol=1e-4, msg=name)


def test_fused_attention_without_gradients_uses_sdpa_and_matches_eager():
    eager, fast = pair(mem_len=6, same_length=True, clamp_len=4)
    ids = torch.randint(1, 40, (3, 10))
    with torch.inference_mode():
        e1, f1 = eager(ids[:, :4]), fast(ids[:, :4])
        e2 = eager(ids[:, 4:], mems=e1.mems.without_cache())
        f2 = fast(ids[:, 4:], mems=f1.mems.without_cache())
    torch.testing.assert_close(e1.logits, f1.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e2.logits, f2.logits, atol=1e-5, rtol=1e-5)


def test_fused_attention_with_attention_dropout_trains():
    """dropatt > 0 in training takes the baddbmm route; in eval it matches eager (dropout off)."""
    eager, fast = pair(mem_len=4, dropatt=0.5)
    ids = torch.randint(1, 40, (2, 6))
    fast.train()
    out = fast(ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in fast.parameters())
    eager.eval(), fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(eager(ids).logits, fast(ids).logits, atol=1e-5, rtol=1e-5)


def test_fused_attention_under_bf16_autocast_follows_fp32():
    eager, fast = pair(mem_len=6)
    ids = torch.randint(1, 40, (2, 8))
    with torch.no_grad():
        reference = eager(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = fast(ids).logits
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, atol=5e-2, rtol=5e-2)


# ----------------------------------------------------------------------------------------------------
# Inference caches == recomputation
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("pre_lnorm,same_length,clamp_len,untie_r,padded", CASES)
def test_cached_multi_segment_evaluation_equals_uncached(
    implementation, pre_lnorm, same_length, clamp_len, untie_r, padded
):
    config = tiny_config(mem_len=5, pre_lnorm=pre_lnorm, same_length=same_length, clamp_len=clamp_len, untie_r=untie_r)
    cached = TxlForCausalLM(config).eval()
    cached.set_attn_implementation(implementation)
    plain = no_cache(copy.deepcopy(cached))
    ids = torch.randint(1, 40, (2, 3 + 4 * 4))
    mask = left_padding(2, 3, 2) if padded else None
    with torch.inference_mode():
        a = cached(ids[:, :3], attention_mask=mask)
        b = plain(ids[:, :3], attention_mask=mask)
        assert a.mems.kv is not None and b.mems.kv is None
        for start in range(3, ids.shape[1], 4):
            a = cached(ids[:, start : start + 4], mems=a.mems)
            b = plain(ids[:, start : start + 4], mems=b.mems)
            torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
            for layer in range(config.n_layer):
                assert torch.equal(a.mems[layer], b.mems[layer]) or torch.allclose(
                    a.mems[layer], b.mems[layer], atol=1e-5
                )
            assert (a.mems.padding_mask is None) == (b.mems.padding_mask is None)


@pytest.mark.parametrize("pre_lnorm", [False, True])
def test_cache_holds_the_projection_of_the_memory_and_of_r(pre_lnorm):
    config = tiny_config(mem_len=6, pre_lnorm=pre_lnorm, clamp_len=3)
    model = TxlModel(config).eval()
    ids = torch.randint(1, 40, (2, 4))
    with torch.no_grad():
        mems = model(ids).mems
        mems = model(ids, mems=mems).mems  # 8 positions seen: the memory (and the cache) keep the last 6
        mems = model(ids[:, :1], mems=mems).mems
        inner = config.n_head * config.d_head
        for layer, hidden, kv, r_head in zip(model.layers, mems, mems.kv, mems.r_head):
            assert kv.shape == (2, 2, config.n_head, config.mem_len, config.d_head)  # keys/values, B, H, M, D
            x = layer.attn.layer_norm(hidden) if pre_lnorm else hidden
            expected = F.linear(x, layer.attn.qkv_proj.weight[inner:])  # [B, M, 2*H*D], keys then values
            expected = expected.view(2, config.mem_len, 2, config.n_head, config.d_head).permute(2, 0, 3, 1, 4)
            torch.testing.assert_close(kv, expected, atol=1e-6, rtol=1e-5)
            klen = r_head.shape[1]
            assert r_head.shape == (config.n_head, klen, config.d_head) and klen >= config.mem_len + 1
            pos_emb = sinusoid_position_embedding(klen, config.d_model, config.clamp_len)
            expected = layer.attn.r_proj(pos_emb).view(klen, config.n_head, config.d_head).transpose(0, 1)
            torch.testing.assert_close(r_head, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pre_lnorm,same_length,clamp_len,untie_r,padded", CASES)
def test_cached_generation_equals_uncached(pre_lnorm, same_length, clamp_len, untie_r, padded):
    config = tiny_config(mem_len=6, pre_lnorm=pre_lnorm, same_length=same_length, clamp_len=clamp_len, untie_r=untie_r)
    model = TxlForCausalLM(config).eval()
    plain = no_cache(copy.deepcopy(model))
    prompt = torch.randint(1, 40, (2, 5))
    mask = left_padding(2, 5, 2) if padded else torch.ones(2, 5, dtype=torch.long)
    kwargs = dict(max_new_tokens=15, do_sample=False, output_scores=True, return_dict_in_generate=True)
    a = model.generate(prompt, attention_mask=mask, **kwargs)
    b = plain.generate(prompt, attention_mask=mask, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    for sa, sb in zip(a.scores, b.scores):
        torch.testing.assert_close(sa, sb, atol=1e-5, rtol=1e-5)


def test_cached_beam_search_and_several_sequences_equal_uncached():
    model = TxlForCausalLM(tiny_config(mem_len=8)).eval()
    plain = no_cache(copy.deepcopy(model))
    prompt = torch.randint(1, 40, (2, 4))
    for kwargs in (dict(num_beams=3, num_return_sequences=2), dict(do_sample=True, num_return_sequences=3)):
        torch.manual_seed(1)
        a = model.generate(prompt, max_new_tokens=10, **kwargs)
        torch.manual_seed(1)
        b = plain.generate(prompt, max_new_tokens=10, **kwargs)
        assert torch.equal(a, b)


def test_cache_is_carried_by_memory_operations_and_dropped_on_dtype_change():
    model = TxlModel(tiny_config(mem_len=4)).eval()
    with torch.no_grad():
        mems = model(torch.randint(1, 40, (3, 5))).mems
    assert mems.kv is not None and mems.r_head is not None
    index = torch.tensor([2, 0])
    picked = mems.index_select(index)
    assert all(torch.equal(p, m[:, index]) for p, m in zip(picked.kv, mems.kv))  # kv [2, B, H, M, D]
    assert picked.cache_key == mems.cache_key and all(p is m for p, m in zip(picked.r_head, mems.r_head))
    repeated = mems.repeat_interleave(2)
    assert all(torch.equal(r, m.repeat_interleave(2, 1)) for r, m in zip(repeated.kv, mems.kv))
    assert all(a is b for a, b in zip(mems.detach().kv, mems.kv)) and all(
        a is b for a, b in zip(mems.to("cpu").kv, mems.kv)
    )
    converted = mems.to(torch.float64)
    assert converted.kv is None and converted[0].dtype == torch.float64
    assert mems.without_cache().kv is None


def test_cache_is_ignored_in_training_and_after_a_weight_update():
    config = tiny_config(mem_len=5)
    model = TxlForCausalLM(config)
    reference = no_cache(copy.deepcopy(model))
    ids = torch.randint(1, 40, (2, 6))
    model.eval()
    with torch.no_grad():
        mems = model(ids).mems
    assert mems.kv is not None
    # an optimizer step changes the weights in place: the cached projections are stale and must not be used
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(ids, mems=mems, labels=ids).loss.backward()  # training ignores the cache
    optimizer.step()
    reference.load_state_dict(model.state_dict())
    model.eval(), reference.eval()
    with torch.no_grad():
        expected = reference(ids, mems=mems.without_cache()).logits
        torch.testing.assert_close(model(ids, mems=mems).logits, expected, atol=1e-6, rtol=1e-5)
    # training outputs with a cached memory equal those with the bare memory
    model.train()
    torch.testing.assert_close(
        model(ids, mems=mems).logits, model(ids, mems=mems.without_cache()).logits, atol=0, rtol=0
    )


def test_long_generation_keeps_cache_bounded():
    model = TxlForCausalLM(tiny_config(mem_len=4)).eval()
    out = model.generate(torch.randint(1, 40, (1, 3)), max_new_tokens=30, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape[1] == 33
    with torch.no_grad():
        mems = model(out.sequences[:, :3]).mems
        for step in range(3, 12):
            mems = model(out.sequences[:, step : step + 1], mems=mems).mems
            assert all(kv.shape[3] == 4 for kv in mems.kv)
            assert mems.r_head[0].shape[1] == 4 + 3  # computed once (mem_len + prompt), then reused
    assert math.isfinite(float(mems.kv[0].sum()))


def test_memory_store_is_written_in_place_and_equals_recomputation():
    """Generation steps append to the memory's preallocated store (no copy of the memory) until it is full, then
    move to a new one; every memory along the way equals the uncached one."""
    config = tiny_config(mem_len=16)
    model = TxlModel(config).eval()
    plain = no_cache(copy.deepcopy(model))
    ids = torch.randint(1, 40, (2, 60))
    stores, views = [], []
    with torch.inference_mode():
        a, b = model(ids[:, :3]), plain(ids[:, :3])
        for step in range(3, ids.shape[1]):
            previous = a.mems
            a = model(ids[:, step : step + 1], mems=a.mems)
            b = plain(ids[:, step : step + 1], mems=b.mems)
            torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, atol=1e-5, rtol=1e-5)
            for layer in range(config.n_layer):
                torch.testing.assert_close(a.mems[layer], b.mems[layer], atol=1e-5, rtol=1e-5)
            in_place = a.mems.store is previous.store
            # in place exactly while the store has room; the new memory is then the old one shifted by a position
            assert in_place == (previous.store_end < previous.store.capacity), step
            shifted = previous[0][:, 1:] if previous.mem_len == config.mem_len else previous[0]
            views.append(not in_place or a.mems[0].data_ptr() == shifted.data_ptr())
            stores.append(a.mems.store)
    assert all(views) and sum(s is t for s, t in zip(stores, stores[1:])) > len(stores) // 2
    distinct = len({id(store) for store in stores})
    # a new store only when one is full: capacity mem_len + mem_len / 4, so one every 4 steps once the memory is full
    assert 1 < distinct <= len(stores) // 4 + 1, (distinct, len(stores))
    assert stores[-1].capacity == config.mem_len + config.mem_len // 4


def test_moving_to_a_new_store_releases_the_old_one_layer_by_layer():
    """A memory updated in place (``cache=``) that fills its store moves to a new one, and with no fork sharing the
    old store each layer's old buffers are released as soon as they are copied (the move needs one layer's buffers
    beyond the memory, not a second store); a view someone still holds keeps its own buffer, unchanged. With a fork
    sharing the store, nothing of it is released."""
    config = tiny_config(mem_len=8)
    model = TxlModel(config).eval()
    plain = no_cache(copy.deepcopy(model))
    ids = torch.randint(1, 40, (2, 40))
    with torch.inference_mode():
        cache, reference = model(ids[:, :3]).cache, plain(ids[:, :3]).mems
        held, held_copy, moves = None, None, 0
        for step in range(3, ids.shape[1]):
            old = cache.store
            if step == 20:
                held = cache[1]  # a view of the old store, kept by the caller
                held_copy = held.clone()
            shared = step >= 30
            fork = cache.fork() if shared else None  # e.g. a `mems=` continuation of this memory
            buffers = [weakref.ref(t) for t in (*old.hidden, *old.kv)]
            out = model(ids[:, step : step + 1], cache=cache)
            reference = plain(ids[:, step : step + 1], mems=reference).mems
            assert out.cache is cache
            for layer in range(config.n_layer):
                torch.testing.assert_close(cache[layer], reference[layer], atol=1e-5, rtol=1e-5)
            if cache.store is not old:
                moves += 1
                if shared:
                    assert all(t is not None for t in old.hidden + old.kv) and all(b() is not None for b in buffers)
                    assert fork.store is old
                else:
                    assert all(t is None for t in old.hidden + old.kv)
                    alive = [b() is not None for b in buffers]
                    expected = [held is not None and b() is not None and b().data_ptr() <= held.data_ptr()
                                < b().data_ptr() + b().numel() * b().element_size() for b in buffers]  # fmt: skip
                    assert alive == expected  # only the buffer under the held view survives
            del fork
        assert moves >= 4
        assert torch.equal(held, held_copy)


def test_a_failed_move_to_a_new_store_keeps_the_memory(monkeypatch):
    """If allocating the new store fails midway (out of memory), the memory is intact and the next segment works."""
    config = tiny_config(mem_len=8, n_layer=3)
    model = TxlModel(config).eval()
    plain = no_cache(copy.deepcopy(model))
    ids = torch.randint(1, 40, (2, 30))
    with torch.inference_mode():
        cache, reference = model(ids[:, :8]).cache, plain(ids[:, :8]).mems
        step = 8
        while cache.store_end < cache.store.capacity:  # fill the store: the next segment must move
            model(ids[:, step : step + 1], cache=cache)
            reference = plain(ids[:, step : step + 1], mems=reference).mems
            step += 1
        before = [m.clone() for m in cache]
        calls, layer_buffers = [], MemoryStore.layer_buffers

        def fail_on_the_last_layer(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("out of memory (simulated)")
            return layer_buffers(*args, **kwargs)

        monkeypatch.setattr(MemoryStore, "layer_buffers", staticmethod(fail_on_the_last_layer))
        with pytest.raises(RuntimeError, match="simulated"):
            model(ids[:, step : step + 1], cache=cache)
        monkeypatch.undo()
        assert cache.store is None and cache.seen_tokens == step
        for layer, m in enumerate(cache):
            assert torch.equal(m, before[layer])
        for next_step in range(step, step + 3):
            out = model(ids[:, next_step : next_step + 1], cache=cache)
            expected = plain(ids[:, next_step : next_step + 1], mems=reference)
            reference = expected.mems
            torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_reusing_an_older_memory_does_not_overwrite_a_newer_one():
    """Two continuations of the same memory (e.g. scoring two candidates) must not share storage: the second one
    copies the memory into a new store instead of writing where the first one's memory lives."""
    model = TxlModel(tiny_config(mem_len=6)).eval()
    plain = no_cache(copy.deepcopy(model))
    prefix, first, second = torch.randint(1, 40, (3, 2, 4)).unbind(0)
    with torch.inference_mode():
        mems = model(prefix).mems
        out_first = model(first, mems=mems)
        kept = [m.clone() for m in out_first.mems]
        out_second = model(second, mems=mems)  # the same (now older) memory again
        assert out_second.mems.store is not out_first.mems.store
        for layer, m in enumerate(out_first.mems):
            assert torch.equal(m, kept[layer])  # untouched by the second continuation
        reference = plain(second, mems=plain(prefix).mems)
        torch.testing.assert_close(out_second.last_hidden_state, reference.last_hidden_state, atol=1e-5, rtol=1e-5)
        # and continuing the first branch still sees its own memory
        third = torch.randint(1, 40, (2, 1))
        again = model(third, mems=out_first.mems).last_hidden_state
        expected = plain(third, mems=plain(first, mems=plain(prefix).mems).mems).last_hidden_state
        torch.testing.assert_close(again, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("same_length", [False, True])
def test_generation_steps_skip_the_mask_only_when_every_key_is_visible(same_length):
    for mem_len in (1, 3, 6):
        for mlen in range(0, 8):
            for qlen in (1, 2, 3):
                mask = causal_memory_mask(qlen, mlen, mem_len, same_length)
                assert sees_every_key(qlen, mlen, mem_len, same_length) == bool(mask.all()), (mem_len, mlen, qlen)


def test_plain_list_memory_still_works_without_cache():
    model = TxlModel(tiny_config(mem_len=4)).eval()
    ids = torch.randint(1, 40, (2, 3))
    with torch.no_grad():
        mems = model(ids).mems
        a = model(ids, mems=list(mems)).last_hidden_state
        b = model(ids, mems=mems).last_hidden_state
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert isinstance(mems, TxlCache)


# ----------------------------------------------------------------------------------------------------
# torch.compile (the training script's --torch_compile)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_training_step_matches_eager():
    torch._dynamo.reset()
    eager, fast = pair(mem_len=4)
    compiled = torch.compile(fast)
    ids = torch.randint(1, 40, (2, 12))
    results = []
    for model in (eager, compiled):
        model.train()
        first = model(ids[:, :6], labels=ids[:, :6])
        second = model(ids[:, 6:], mems=first.mems, labels=ids[:, 6:])
        (first.loss + second.loss).backward()
        grads = {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters()}
        results.append((second.logits.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-4, rtol=1e-4)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_training_step_under_bf16_autocast_follows_fp32(implementation):
    config = tiny_config(mem_len=6)
    model = TxlForCausalLM(config)
    model.set_attn_implementation(implementation)
    ids = torch.randint(1, 40, (2, 8))
    first = model(ids, labels=ids)
    reference = model(ids, mems=first.mems, labels=ids).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = model(ids, labels=ids)
        low = model(ids, mems=first.mems, labels=ids).loss
    low.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert abs(low.item() - reference.item()) < 0.05


def test_shifted_view_equals_rel_shift_and_has_its_gradient():
    from hf_txl.modeling_txl import _shifted_view, rel_shift

    x = torch.randn(2, 3, 4, 7, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(_shifted_view(F.pad(x, (1, 0))), rel_shift(x), atol=0, rtol=0)
    assert torch.autograd.gradcheck(lambda t: _shifted_view(F.pad(t, (1, 0))), (x,))


@pytest.mark.parametrize("same_length,clamp_len", [(False, -1), (True, 3)])
def test_fused_generation_steps_match_eager(same_length, clamp_len):
    """One-token steps take a shortcut (no shift, no padding) in the fused path."""
    eager, fast = pair(mem_len=6, same_length=same_length, clamp_len=clamp_len)
    eager.eval(), fast.eval()
    prompt = torch.randint(1, 40, (2, 5))
    kwargs = dict(max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True)
    a, b = eager.generate(prompt, **kwargs), fast.generate(prompt, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    for sa, sb in zip(a.scores, b.scores):
        torch.testing.assert_close(sa, sb, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Fast dropout (CPU) == inverted dropout
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_fast_dropout_keeps_each_element_independently_with_probability_one_minus_p(p):
    torch.manual_seed(0)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_additive_mask_equals_masked_fill_after_the_addition(dtype):
    torch.manual_seed(0)
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


def fast_dropout_seeded(x, p):
    torch.manual_seed(7)  # the same mask at every call, so gradcheck's finite differences see one function
    return fast_dropout(x, p, training=True)


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


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_dropout_is_the_reference_on_the_eager_path_and_fast_on_sdpa(implementation):
    model = TxlForCausalLM(tiny_config(dropout=0.3))
    model.set_attn_implementation(implementation)
    model.train()
    drop = model.transformer.drop
    x = torch.randn(3, 7, 16)
    torch.manual_seed(5)
    out = drop(x)
    torch.manual_seed(5)
    reference = F.dropout(x, 0.3, training=True)
    torch.manual_seed(5)
    fast = fast_dropout(x, 0.3, training=True)
    assert torch.equal(out, reference if implementation == "eager" else fast)
    assert not torch.equal(reference, fast)


def test_model_dropout_modules_use_fast_dropout_and_train():
    model = TxlForCausalLM(tiny_config(mem_len=4, dropout=0.3, dropatt=0.2))
    model.set_attn_implementation("sdpa")
    assert all(type(m).__name__ == "TxlDropout" for m in model.modules() if isinstance(m, torch.nn.Dropout))
    model.train()
    ids = torch.randint(1, 40, (2, 8))
    torch.manual_seed(0)
    a = model(ids, labels=ids)
    a.loss.backward()
    assert math.isfinite(a.loss.item()) and all(p.grad is not None for p in model.parameters())
    torch.manual_seed(0)
    assert torch.equal(model(ids, labels=ids).logits, a.logits)  # reproducible under a seed
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)


# ----------------------------------------------------------------------------------------------------
# Allocator setting of the scripts
# ----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator setting: Linux only")
def test_keeping_freed_memory_is_applied_on_glibc():
    """The setting is applied in a fresh process (its effect, fewer page faults per step, is measured in
    bench/bench_allocator.py, not asserted here)."""
    code = "from hf_txl.training import keep_freed_memory_in_process as k; print(k(), k())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


@pytest.mark.parametrize(
    "cpuinfo,expected",
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n", False),
        ("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n", True),
        ("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n", True),
        ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),
        ("processor\t: 0\nFeatures\t: fp asimd\n", False),
        ("nothing useful here\n", None),
    ],
)
def test_native_bf16_detection_reads_the_cpu_flags(cpuinfo, expected):
    from hf_txl.training import cpu_has_native_bf16

    assert cpu_has_native_bf16(cpuinfo) is expected


@pytest.mark.slow
def test_prepared_device_check_runs_and_passes_on_the_cpu(tmp_path):
    """bench/device_check.py is the one script run on an accelerator when one is lent; keep it working here."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, str(root / "bench" / "device_check.py"), "--device", "cpu", "--quick"],
        capture_output=True, text=True, env=env, cwd=root, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    checks = report["checks"]
    assert all(c["ok"] for c in checks.values()), {name: c for name, c in checks.items() if not c["ok"]}
    expected = [f"sdpa == eager, pre_lnorm={p}, bf16={b}" for p in (False, True) for b in (False, True)]
    expected += [f"flex_attention (eager-mode) == eager, bf16={b}" for b in (False, True)]
    expected += [f"cached generation == recomputation, bf16={b}" for b in (False, True)]
    expected += ["bf16 training follows fp32", "scripts/train.py --mixed_precision bf16, 20 steps"]
    expected += [f"{m} training, {mode}: finite losses" for m in ("wt103_base", "enwik8_base")
                 for mode in ("fp32", "amp_fp16", "amp_bf16")]  # fmt: skip
    assert sorted(checks) == sorted(expected)
    for name in ("wt103_base_train", "enwik8_base_train"):
        timing = report["timings"][name]
        assert all(timing[f"{mode}_tok_s"] > 0 for mode in ("fp32", "amp_fp16", "amp_bf16")), timing


def test_device_check_records_a_broken_part_and_goes_on(tmp_path, capsys):
    """A part of the one-shot device run that raises is a recorded failure (with its message), not the end of the
    run, and the results are on disk after every part."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("device_check", root / "bench" / "device_check.py")
    device_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(device_check)
    ran = []
    device_check.guarded("broken part", lambda: 1 / 0)
    device_check.guarded("next part", lambda: ran.append(True))
    assert ran == [True] and device_check.FAILURES == ["broken part ran"]
    assert "ZeroDivisionError" in device_check.RESULTS["checks"]["broken part ran"]["error"]
    device_check.write_results(tmp_path)
    assert not json.loads((tmp_path / "device_check.json").read_text())["checks"]["broken part ran"]["ok"]
    assert "FAIL  broken part ran" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# Few-row projections (generation steps on the CPU) == F.linear
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_features", [48, 36, 7])  # 8, 4 and 1 weight blocks
@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_split_weight_linear_equals_linear(out_features, rows, bias):
    from hf_txl.modeling_txl import split_weight_linear

    x = torch.randn(rows, 1, 20, dtype=torch.float64)
    weight = torch.randn(out_features, 20, dtype=torch.float64)
    b = torch.randn(out_features, dtype=torch.float64) if bias else None
    out = split_weight_linear(x, weight, b)
    assert out.shape == (rows, 1, out_features) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight, b), atol=1e-12, rtol=1e-12)
    out32 = split_weight_linear(x.float(), weight.float(), None if b is None else b.float())
    torch.testing.assert_close(out32, F.linear(x, weight, b).float(), atol=2e-5, rtol=1e-5)


def test_project_takes_the_split_product_only_for_few_rows_of_float32_inference(monkeypatch):
    import hf_txl.modeling_txl as modeling

    calls = []
    real = modeling.split_weight_linear
    monkeypatch.setattr(modeling, "split_weight_linear", lambda *args: calls.append(1) or real(*args))
    monkeypatch.setattr(modeling, "column_products_win", lambda: True)  # a CPU where the split product is faster
    layer = torch.nn.Linear(16, 8)
    few, many = torch.randn(2, 3, 16), torch.randn(modeling.FEW_ROWS + 1, 16)

    def taken(x, module=layer) -> bool:
        calls.clear()
        out = modeling.project(module, x)
        torch.testing.assert_close(out, F.linear(x, module.weight, module.bias), atol=1e-6, rtol=1e-5)
        return bool(calls)

    with torch.no_grad():
        assert taken(few)
        assert not taken(many)
        assert not taken(few.double(), torch.nn.Linear(16, 8).double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            calls.clear()
            assert modeling.project(layer, few).dtype == torch.bfloat16 and not calls  # autocast decides
        subclass = type("MyLinear", (torch.nn.Linear,), {})(16, 8)  # e.g. an adapter or quantized layer
        assert not taken(few, subclass)
        hooked = torch.nn.Linear(16, 8)
        hooked.register_forward_hook(lambda module, args, out: None)
        assert not taken(few, hooked)
    assert not taken(few)  # gradients enabled: the layer itself (autograd)
    with torch.inference_mode():
        assert taken(few)
    monkeypatch.setattr(modeling, "column_products_win", lambda: False)  # a CPU where F.linear is faster
    linear_calls, real_linear = [], F.linear
    monkeypatch.setattr(modeling.F, "linear", lambda *args: linear_calls.append(1) or real_linear(*args))
    monkeypatch.setattr(layer, "forward", None)  # the module call is skipped: F.linear directly
    calls.clear()
    with torch.no_grad():
        out = modeling.project(layer, few)
        assert linear_calls == [1] and not calls
        torch.testing.assert_close(out, real_linear(few, layer.weight, layer.bias), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 24), (1, 24), (24,)])
@pytest.mark.parametrize("bias", [True, False])
def test_one_row_linear_equals_linear(dtype, shape, bias):
    from hf_txl.modeling_txl import one_row_linear

    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    weight = torch.randn(40, 24, dtype=torch.float64)
    b = torch.randn(40, dtype=torch.float64) if bias else None
    exact = F.linear(x, weight, b)
    low = (x.to(dtype), weight.to(dtype), None if b is None else b.to(dtype))
    out = one_row_linear(*low)
    assert out.shape == exact.shape and out.dtype == dtype
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]  # low-precision inputs
    torch.testing.assert_close(out.double(), exact, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(out, F.linear(*low), atol=tolerance / 10, rtol=tolerance / 10)  # F.linear's rounding


def test_project_takes_addmv_only_for_one_row_of_bf16_or_fp16_inference(monkeypatch):
    import hf_txl.modeling_txl as modeling

    calls = []
    real = modeling.one_row_linear
    monkeypatch.setattr(modeling, "one_row_linear", lambda *args: calls.append(1) or real(*args))
    layer = torch.nn.Linear(16, 8).bfloat16()

    def taken(x, module=layer) -> bool:
        calls.clear()
        out = modeling.project(module, x)
        assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], 8)
        reference = F.linear(x.float(), module.weight.float(), module.bias.float()).to(x.dtype)
        torch.testing.assert_close(out, reference, atol=5e-2, rtol=2e-2)
        return bool(calls)

    one, three = torch.randn(1, 1, 16).bfloat16(), torch.randn(3, 1, 16).bfloat16()
    with torch.no_grad():
        assert taken(one)
        assert taken(one.half(), torch.nn.Linear(16, 8).half())
        assert not taken(three)  # several rows: the matrix product
        assert not taken(one.float(), torch.nn.Linear(16, 8))  # float32 has its own choice (column_products_win)
        with pytest.raises(RuntimeError, match="same dtype"):  # mixed dtypes: the layer decides (and raises)
            modeling.project(torch.nn.Linear(16, 8), one)
        assert not calls
    assert not taken(one)  # gradients enabled: the layer itself (autograd)


def test_bf16_generation_with_one_row_products_equals_the_layers_products(monkeypatch):
    import hf_txl.modeling_txl as modeling

    torch.manual_seed(0)
    model = TxlForCausalLM(tiny_config()).eval().to(torch.bfloat16)
    prompt = torch.randint(1, 40, (1, 9))
    calls, real = [], modeling.one_row_linear
    monkeypatch.setattr(modeling, "one_row_linear", lambda *args: calls.append(1) or real(*args))
    kwargs = dict(max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True)
    fast = model.generate(prompt, **kwargs)
    assert len(calls) >= 11 * 2 * 4  # every step after the prompt: 4 projections per layer (qkv, o, fc_in, fc_out)
    monkeypatch.setattr(modeling, "one_row_linear", lambda x, weight, bias: F.linear(x, weight, bias))
    reference = model.generate(prompt, **kwargs)
    assert torch.equal(fast.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(fast.scores), torch.stack(reference.scores), atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("split_over_linear_time, expected", [(0.3, True), (0.79, True), (0.9, False), (2.0, False)])
def test_the_split_product_is_taken_where_it_is_measured_faster_by_the_margin(
    monkeypatch, split_over_linear_time, expected
):
    import hf_txl.modeling_txl as modeling

    timings = []
    monkeypatch.setattr(modeling, "COLUMN_PRODUCTS_WIN", {})
    monkeypatch.setattr(modeling, "_time_one_row_products", lambda: timings.append(1) or split_over_linear_time)
    assert modeling.column_products_win() is expected
    assert modeling.column_products_win() is expected and len(timings) == 1  # measured once per thread count


def test_the_one_row_timing_compares_both_products():
    import hf_txl.modeling_txl as modeling

    ratio = modeling._time_one_row_products(repeats=1)
    assert 0.01 < ratio < 100  # both timed, finite: which one wins is the machine's


@pytest.mark.parametrize("split", [True, False])
def test_generation_with_few_row_products_equals_plain_linear(monkeypatch, split):
    import hf_txl.modeling_txl as modeling

    monkeypatch.setattr(modeling, "column_products_win", lambda: split)
    model = TxlForCausalLM(tiny_config(mem_len=8, init_std=0.3)).eval()
    prompt = torch.randint(1, 40, (2, 5))
    kwargs = dict(max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True)
    mask = left_padding(2, 5, 2)
    fast = model.generate(prompt, attention_mask=mask, **kwargs)
    monkeypatch.setattr(modeling, "FEW_ROWS", 0)  # every projection through nn.Linear
    plain = model.generate(prompt, attention_mask=mask, **kwargs)
    assert torch.equal(fast.sequences, plain.sequences)
    for a, b in zip(fast.scores, plain.scores):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("head_major", [True, False])
def test_one_query_position_scores_equal_the_formula(batch, head_major):
    from hf_txl.modeling_txl import scaled_position_scores

    n_head, klen, d_head = 4, 9, 8
    query = torch.randn(batch, n_head, 1, d_head, dtype=torch.float64)
    v = torch.randn(n_head, d_head, dtype=torch.float64)
    projected = torch.randn(klen, n_head * d_head, dtype=torch.float64)  # W_{k,R} R as r_proj returns it
    position_head = projected.view(klen, n_head, d_head).transpose(0, 1)  # [H, K, D], a strided view
    if head_major:
        position_head = position_head.contiguous()  # as the inference cache keeps it
    expected = torch.einsum("bhd,khd->bhk", query[:, :, 0] + v, projected.view(klen, n_head, d_head)) * 0.3
    out = scaled_position_scores(query, position_head, v, 0.3)
    assert out.shape == (batch, n_head, 1, klen)
    torch.testing.assert_close(out[:, :, 0], expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("columns", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_one_query_position_scores_take_either_product_form_in_float32(monkeypatch, columns, batch):
    import hf_txl.modeling_txl as modeling

    monkeypatch.setattr(modeling, "column_products_win", lambda: columns)
    n_head, klen, d_head = 4, 9, 8
    query = torch.randn(batch, n_head, 1, d_head)
    v = torch.randn(n_head, d_head)
    position_head = torch.randn(n_head, klen, d_head)  # [H, K, D], head-major as the inference cache keeps it
    expected = torch.einsum("bhd,hkd->bhk", query[:, :, 0].double() + v.double(), position_head.double()) * 0.3
    out = modeling.scaled_position_scores(query, position_head, v, 0.3)
    assert out.shape == (batch, n_head, 1, klen) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, :, 0].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("split", [True, False])
def test_loaded_weights_are_aligned_and_stay_tied(tmp_path, monkeypatch, split):
    from transformers import AutoModelForCausalLM

    import hf_txl.modeling_txl as modeling

    monkeypatch.setattr(modeling, "column_products_win", lambda: split)

    model = TxlForCausalLM(tiny_config(mem_len=4)).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(p.data_ptr() % 64 == 0 for p in loaded.parameters())
    assert loaded.lm_head.weight is loaded.transformer.word_emb.weight
    loaded_with_info, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(info, dict) and all(p.data_ptr() % 64 == 0 for p in loaded_with_info.parameters())
    ids = torch.randint(1, 40, (1, 6))
    with torch.no_grad():  # prompt, then one-token steps (few-row products): bit for bit
        a, b = model(ids[:, :5]), loaded(ids[:, :5])
        assert torch.equal(a.logits, b.logits)
        assert torch.equal(model(ids[:, 5:], cache=a.cache).logits, loaded(ids[:, 5:], cache=b.cache).logits)
