"""The paper's maths: relative attention, rel-shift, masks, segment recurrence and the memory."""

import copy
import gc
import math
import weakref

import pytest
import torch
from conftest import tiny_config

from hf_txl import TxlForCausalLM, TxlModel
from hf_txl.modeling_txl import causal_memory_mask, rel_shift, sinusoid_position_embedding


def test_rel_shift_worked_example_from_docstring():
    a0, a1, a2, b0, b1, b2 = 1.0, 2.0, 3.0, 4.0, 5.0, 6.0
    x = torch.tensor([[a0, a1, a2], [b0, b1, b2]])
    out = rel_shift(x)
    assert out[0, :2].tolist() == [a1, a2]  # query 0 (M=1) sees keys 0..1
    assert out[1].tolist() == [b0, b1, b2]


@pytest.mark.parametrize("qlen,mlen", [(1, 0), (4, 0), (3, 5), (6, 2)])
def test_rel_shift_places_distance_m_plus_i_minus_j_at_key_j(qlen, mlen):
    klen = qlen + mlen
    # raw[i, c] encodes the distance K-1-c it stands for; after the shift entry (i, j) must be M+i-j.
    raw = (klen - 1 - torch.arange(klen)).float().expand(2, qlen, klen).contiguous()
    raw = raw + 1000 * torch.arange(qlen)[:, None]  # and keep track of the query row
    out = rel_shift(raw)
    for i in range(qlen):
        for j in range(mlen + i + 1):
            assert out[1, i, j].item() == 1000 * i + (mlen + i - j)


def test_sinusoid_matches_formula_and_clamp():
    d, klen = 8, 6
    emb = sinusoid_position_embedding(klen, d, clamp_len=-1)
    for row in range(klen):
        pos = klen - 1 - row
        for k in range(d // 2):
            angle = pos / 10000 ** (2 * k / d)
            assert emb[row, k].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert emb[row, d // 2 + k].item() == pytest.approx(math.cos(angle), abs=1e-6)
    clamped = sinusoid_position_embedding(klen, d, clamp_len=2)
    assert torch.equal(clamped[0], clamped[3])  # distances 5 and 2 both use R_2
    assert torch.equal(clamped[4:], emb[4:])  # distances 1, 0 unchanged


def test_masks_causal_and_same_length():
    allowed = causal_memory_mask(qlen=3, mlen=2, mem_len=2, same_length=False)
    assert allowed.tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, True, True, True],
    ]
    # same_length: every query sees exactly mem_len=2 keys once the memory is full.
    same = causal_memory_mask(qlen=3, mlen=2, mem_len=2, same_length=True)
    assert same.sum(-1).tolist() == [2, 2, 2]
    assert same.tolist() == [
        [False, True, True, False, False],
        [False, False, True, True, False],
        [False, False, False, True, True],
    ]


def reference_attention(attn, hidden, mem, u, v, clamp_len, same_length, mem_len):
    """Relative attention by direct loops over queries i, keys j and heads, from the paper:

    score(i, j) = [(q_i + u)·k_j + (q_i + v)·W_{k,R} R_{clamp(M+i-j)}] / sqrt(D), masked, softmax, sum of v_j.
    """
    batch, qlen, d_model = hidden.shape
    mlen = 0 if mem is None else mem.shape[1]
    cat = hidden if mem is None else torch.cat([mem, hidden], 1)
    if attn.pre_lnorm:
        cat = attn.layer_norm(cat)
    H, D = attn.n_head, attn.d_head
    w_q, w_k, w_v = attn.qkv_proj.weight.split(H * D, dim=0)
    q = (cat[:, mlen:] @ w_q.T).view(batch, qlen, H, D)
    k = (cat @ w_k.T).view(batch, mlen + qlen, H, D)
    val = (cat @ w_v.T).view(batch, mlen + qlen, H, D)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d_model, 2.0) / d_model))
    out = torch.zeros(batch, qlen, H, D)
    for b in range(batch):
        for i in range(qlen):
            visible = [j for j in range(mlen + i + 1)]
            if same_length:
                visible = visible[-mem_len:]
            for h in range(H):
                scores = []
                for j in visible:
                    dist = mlen + i - j
                    if clamp_len > 0:
                        dist = min(dist, clamp_len)
                    angle = dist * inv_freq
                    r = torch.cat([angle.sin(), angle.cos()])
                    r_k = (attn.r_proj.weight @ r).view(H, D)[h]
                    ac = (q[b, i, h] + u[h]) @ k[b, j, h]
                    bd = (q[b, i, h] + v[h]) @ r_k
                    scores.append((ac + bd) / math.sqrt(D))
                probs = torch.softmax(torch.stack(scores), 0)
                out[b, i, h] = sum(p * val[b, j, h] for p, j in zip(probs, visible))
    out = attn.o_proj(out.reshape(batch, qlen, H * D))
    return hidden + out if attn.pre_lnorm else attn.layer_norm(hidden + out)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "clamp_len,same_length,pre_lnorm,untie_r",
    [(-1, False, False, True), (3, False, True, False), (2, True, False, True), (-1, True, True, False)],
)
def test_attention_matches_direct_loop(implementation, clamp_len, same_length, pre_lnorm, untie_r):
    config = tiny_config(clamp_len=clamp_len, same_length=same_length, pre_lnorm=pre_lnorm, untie_r=untie_r, mem_len=4)
    model = TxlModel(config).eval()
    model.set_attn_implementation(implementation)
    assert model.config._attn_implementation == implementation
    hidden = torch.randn(2, 3, config.d_model)
    mem = torch.randn(2, 4, config.d_model)
    layer = model.layers[1]
    u = layer.attn.r_w_bias if untie_r else model.r_w_bias
    v = layer.attn.r_r_bias if untie_r else model.r_r_bias
    assert u.abs().sum() > 0 and v.abs().sum() > 0  # initialised, so the bias terms are exercised
    klen = 7
    pos_emb = sinusoid_position_embedding(klen, config.d_model, clamp_len)
    allowed = causal_memory_mask(3, 4, config.mem_len, same_length)[None]
    with torch.no_grad():
        fast, _ = layer.attn(hidden, mem, pos_emb, allowed, u, v)
        slow = reference_attention(layer.attn, hidden, mem, u, v, clamp_len, same_length, config.mem_len)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pre_lnorm", [False, True])
@pytest.mark.parametrize("clamp_len", [-1, 5])
def test_segments_with_memory_equal_one_pass(pre_lnorm, clamp_len):
    config = tiny_config(pre_lnorm=pre_lnorm, clamp_len=clamp_len, mem_len=48)
    model = TxlForCausalLM(config).eval()
    ids = torch.randint(1, config.vocab_size, (3, 40))
    with torch.no_grad():
        whole = model(ids).logits
        pieces, mems = [], None
        for chunk in ids.split([7, 13, 1, 19], dim=1):
            out = model(chunk, mems=mems)
            pieces.append(out.logits)
            mems = out.mems
    assert (torch.cat(pieces, 1) - whole).abs().max().item() <= 1e-5


def test_memory_truncated_to_mem_len_and_holds_layer_inputs():
    config = tiny_config(mem_len=5)
    model = TxlForCausalLM(config).eval()
    ids = torch.randint(1, config.vocab_size, (2, 12))
    with torch.no_grad():
        first = model(ids[:, :4], output_hidden_states=True)
        assert first.mems.mem_len == 4  # fewer tokens than mem_len so far
        second = model(ids[:, 4:], mems=first.mems, output_hidden_states=True)
    assert len(second.mems) == config.n_layer
    for layer in range(config.n_layer):
        assert second.mems[layer].shape == (2, 5, config.d_model)
        expected = torch.cat([first.hidden_states[layer], second.hidden_states[layer]], 1)[:, -5:]
        torch.testing.assert_close(second.mems[layer], expected, atol=0, rtol=0)


def test_first_segment_starts_from_empty_memory_and_mem_len_zero_means_none():
    config = tiny_config(mem_len=8)
    model = TxlForCausalLM(config).eval()
    no_memory = TxlForCausalLM(copy.deepcopy(config)).eval()
    no_memory.config.mem_len = 0
    no_memory.load_state_dict(model.state_dict())
    segment_a = torch.randint(1, config.vocab_size, (2, 6))
    segment_b = torch.randint(1, config.vocab_size, (2, 5))
    with torch.no_grad():
        with_memory = model(segment_a)
        without = no_memory(segment_a, use_cache=True)  # even when asked for, mem_len=0 keeps no memory
    assert with_memory.mems is not None and with_memory.mems.mem_len == 6
    assert without.mems is None
    # the first segment starts from an empty memory: the memory length changes nothing there
    torch.testing.assert_close(with_memory.logits, without.logits, atol=0, rtol=0)
    with torch.no_grad():  # with mem_len=0 a second segment does not see the first one
        b_after_a = no_memory(segment_b, mems=without.mems)
        b_alone = no_memory(segment_b)
        b_alone_with_memory = model(segment_b)  # the same weights on B with an empty memory
    assert b_after_a.mems is None
    torch.testing.assert_close(b_after_a.logits, b_alone.logits, atol=0, rtol=0)
    torch.testing.assert_close(b_after_a.logits, b_alone_with_memory.logits, atol=0, rtol=0)
    # whereas with mem_len=8 segment B does see A through the memory (so the check above could fail) ...
    with torch.no_grad():
        b_after_a_with_memory = model(segment_b, mems=with_memory.mems)
        whole = model(torch.cat([segment_a, segment_b], 1)).logits[:, 6:]
    assert (b_after_a_with_memory.logits - b_alone.logits).abs().max().item() > 1e-3
    # ... exactly as one pass over A and B does (the memory holds all of A: 6 <= mem_len)
    torch.testing.assert_close(b_after_a_with_memory.logits, whole, atol=1e-5, rtol=1e-5)


def test_memory_is_detached_and_old_graphs_are_freed():
    config = tiny_config(mem_len=8)
    model = TxlForCausalLM(config).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    mems, first_logits = None, None
    for step in range(30):
        ids = torch.randint(1, config.vocab_size, (2, 8))
        out = model(ids, mems=mems, labels=ids)
        out.loss.backward()  # would fail with "backward through the graph a second time" if mems kept a graph
        optimizer.step()
        optimizer.zero_grad()
        mems = out.mems
        assert all(not m.requires_grad and m.grad_fn is None for m in mems)
        assert mems.mem_len == 8
        if step == 0:
            first_logits = weakref.ref(out.logits)
        del out
    gc.collect()
    assert first_logits() is None  # nothing (such as a graph through the memory) keeps step 0 alive


def test_memory_use_does_not_grow_over_thousands_of_steps():
    config = tiny_config(mem_len=16, n_layer=1)
    model = TxlForCausalLM(config).eval()
    mems = None
    sizes = set()
    with torch.no_grad():
        for _ in range(2000):
            out = model(torch.randint(1, config.vocab_size, (1, 4)), mems=mems)
            mems = out.mems
            sizes.add(sum(m.numel() for m in mems))
    assert sizes == {4 * 32, 8 * 32, 12 * 32, 16 * 32}


def test_eager_and_sdpa_match_outputs_and_gradients():
    config = tiny_config(mem_len=6, same_length=True, clamp_len=4)
    eager = TxlForCausalLM(copy.deepcopy(config))
    eager.set_attn_implementation("eager")
    sdpa = TxlForCausalLM(copy.deepcopy(config))
    sdpa.set_attn_implementation("sdpa")
    sdpa.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    ids = torch.randint(1, config.vocab_size, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    results = []
    for model in (eager, sdpa):
        first = model(ids, attention_mask=mask)
        second = model(ids, mems=first.mems, labels=ids)
        second.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((second.logits.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for name in results[0][1]:
        torch.testing.assert_close(results[0][1][name], results[1][1][name], atol=1e-5, rtol=1e-4)


def test_left_padding_never_attended_now_or_through_memory():
    config = tiny_config(mem_len=32)
    model = TxlForCausalLM(config).eval()
    real = torch.randint(1, config.vocab_size, (1, 5))
    follow = torch.randint(1, config.vocab_size, (1, 4))
    outputs = []
    for pad_value in (0, 7):  # different garbage under the padding must not matter
        padded = torch.cat([torch.full((1, 3), pad_value), real], 1)
        mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
        with torch.no_grad():
            first = model(padded, attention_mask=mask)
            second = model(follow, mems=first.mems)
        outputs.append((first.logits[:, 3:], second.logits))
    with torch.no_grad():
        alone_first = model(real)
        alone_second = model(follow, mems=alone_first.mems)
    for first_logits, second_logits in outputs:
        torch.testing.assert_close(first_logits, alone_first.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(second_logits, alone_second.logits, atol=1e-5, rtol=1e-5)


def test_labels_are_shifted_inside_and_minus_100_ignored():
    config = tiny_config()
    model = TxlForCausalLM(config).eval()
    ids = torch.randint(1, config.vocab_size, (2, 7))
    labels = ids.clone()
    labels[0, 3] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, config.vocab_size)
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(out.loss, expected)
    assert out.loss.dim() == 0
    # shift_labels: targets already aligned with the inputs (the stream pipeline's form)
    shifted = model(ids, shift_labels=labels)
    expected_aligned = torch.nn.functional.cross_entropy(
        out.logits.reshape(-1, config.vocab_size), labels.reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(shifted.loss, expected_aligned)
