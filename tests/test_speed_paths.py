"""Fast paths equal the reference on whole models: the fused attention (``sdpa``) against the eager reference, the
model's dropout, and the inference caches of :class:`TxlCache` (projected memory keys/values, projected position
terms) against recomputation. The kernels themselves (``kernels_txl.py``) are tested in test_kernels.py.

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
from conftest import OTHER_ROUTE, eager_and_fast, left_padding, tiny_config

import hf_txl.kernels_txl as kernels
from hf_txl import TxlCache, TxlForCausalLM
from hf_txl.cache_txl import MemoryStore
from hf_txl.kernels_txl import fast_dropout
from hf_txl.modeling_txl import TxlModel, causal_memory_mask, sees_every_key, sinusoid_position_embedding

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


# init_std 0.2, logits of size ~4: |sdpa - eager| under bf16 autocast measured at most 0.06 (16 cases), while the
# memory moves the logits by at least 2. (At init_std 0.5 bf16 rounding alone moves them by units: chaotic.)
BF16_ATTENTION_TOLERANCE = 0.1


@pytest.mark.parametrize("padded", [False, True])
def test_fused_attention_under_bf16_autocast_equals_eager_under_bf16_autocast(padded):
    """Two segments with the memory, on weights where attention decides the logits, in bf16 (autocast) and in fp32:
    a wrong mask, position term or memory in the fast path moves them far beyond the tolerance."""
    eager, fast = pair(mem_len=6, init_std=0.2, same_length=padded)
    ids = torch.randint(1, 40, (2, 12))
    mask = left_padding(2, 6, 2) if padded else None
    for autocast in (True, False):
        logits = []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for model in (eager, fast):
                first = model(ids[:, :6], attention_mask=mask)
                logits.append(model(ids[:, 6:], mems=first.mems).logits.float())
            alone = eager(ids[:, 6:]).logits.float()  # the same segment without the memory
        tolerance = BF16_ATTENTION_TOLERANCE if autocast else 1e-5
        torch.testing.assert_close(logits[1], logits[0], atol=tolerance, rtol=0)
        assert (logits[0] - alone).abs().amax() > 10 * BF16_ATTENTION_TOLERANCE


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
    """Beams reorder and repeat the memory (and its cached projections): every step's logits equal those of the
    uncached model, on weights where the memory changes the logits by units."""
    model = TxlForCausalLM(tiny_config(mem_len=8, init_std=0.5)).eval()
    plain = no_cache(copy.deepcopy(model))
    prompt = torch.randint(1, 40, (2, 4))
    for kwargs in (dict(num_beams=3, num_return_sequences=2), dict(do_sample=True, num_return_sequences=3)):
        kwargs.update(max_new_tokens=10, output_logits=True, return_dict_in_generate=True)
        torch.manual_seed(1)
        a = model.generate(prompt, **kwargs)
        torch.manual_seed(1)
        b = plain.generate(prompt, **kwargs)
        assert torch.equal(a.sequences, b.sequences)
        # logits of size ~10: measured at most 3e-5 apart (5 seeds); the memory moves them by more than 2
        torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), atol=1e-4, rtol=0)
    with torch.no_grad():
        alone = plain(a.sequences[:, -2:-1]).logits[:, -1]  # the last (sampling) step's input without the memory
    assert ((alone - a.logits[-1]).abs().amax(-1) > 1.0).all()


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


BF16_LOSS_TOLERANCE = 0.01  # |bf16 - fp32| loss after 15 steps measured at most 0.0015 (10 cases); the loss is ~0.9
BF16_GRADIENT_TOLERANCE = 0.05  # |g_bf16 - g_fp32| / |g_fp32| measured at most 0.018 (same cases)


def stream_step(model, ids, autocast):
    """One step's loss and gradients (all parameters, flat) on ``ids`` as two segments of 8 tokens, the memory
    carried between them."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        first = model(ids[:, :8], labels=ids[:, :8])
        second = model(ids[:, 8:], mems=first.mems, labels=ids[:, 8:])
    loss = (first.loss + second.loss) / 2
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_training_step_under_bf16_autocast_follows_fp32(implementation):
    """On a model trained (15 fp32 Adam steps) from ln V = 3.7 down to a loss near 0.9 on a stream it can learn, one
    training step under bf16 autocast gives the fp32 loss and gradients to bf16 rounding."""
    model = TxlForCausalLM(tiny_config(mem_len=8))
    model.set_attn_implementation(implementation)
    ids = torch.randint(1, 40, (2, 16))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):
        stream_step(model, ids, autocast=False)
        optimizer.step()
    loss, grad = stream_step(model, ids, autocast=False)
    low_loss, low_grad = stream_step(model, ids, autocast=True)
    assert loss < math.log(40) - 2
    assert abs(low_loss - loss) < BF16_LOSS_TOLERANCE, (low_loss, loss)
    assert (low_grad - grad).norm() / grad.norm() < BF16_GRADIENT_TOLERANCE


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
# The model's dropout
# ----------------------------------------------------------------------------------------------------


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
    eager, model = pair(mem_len=4, dropout=0.3, dropatt=0.2, init_std=0.5)
    assert all(type(m).__name__ == "TxlDropout" for m in model.modules() if isinstance(m, torch.nn.Dropout))
    model.train()
    ids = torch.randint(1, 40, (2, 8))
    torch.manual_seed(0)
    a = model(ids, labels=ids)
    a.loss.backward()
    assert math.isfinite(a.loss.item()) and all(p.grad is not None for p in model.parameters())
    torch.manual_seed(0)
    assert torch.equal(model(ids, labels=ids).logits, a.logits)  # reproducible under a seed
    model.eval(), eager.eval()  # dropout off: the fast path computes the reference
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, eager(ids).logits, **OTHER_ROUTE)  # 1.2e-5 seen on AVX2
        assert (model(ids).logits - a.logits).abs().amax() > 0.5  # (training's dropout did change the logits)


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
# Loading (the few-row products' rounding depends on the weights' alignment)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["column", "row"])
def test_loaded_weights_are_aligned_and_stay_tied(tmp_path, monkeypatch, form):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(kernels, "cpu_product_form", lambda: form)

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
