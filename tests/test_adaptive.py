"""Adaptive input / adaptive softmax (``cutoffs``, ``div_val``, ``d_embed``, ``proj_share_all_but_first``)."""

import gc

import pytest
import torch
import torch.nn.functional as F
from conftest import full_pass_logits, hand_memory_logits, stepwise_logits, tiny_config
from transformers import AutoModelForCausalLM

from hf_txl import TxlAdaptiveEmbedding, TxlAdaptiveLogSoftmax, TxlConfig, TxlForCausalLM

V = 60
# div_val 1 (one sliced matrix), 2 and 4 (one matrix per cluster), projections shared or not, tied or not.
VARIANTS = {
    "div1": dict(cutoffs=[10, 30]),
    "div1_proj_shared": dict(cutoffs=[10, 30, 45], d_embed=16, proj_share_all_but_first=True),
    "div4_shared": dict(cutoffs=[10, 30], div_val=4, d_embed=64, proj_share_all_but_first=True),
    "div2_untied": dict(cutoffs=[5, 20, 40], div_val=2, tie_word_embeddings=False),
    "no_cutoffs_proj": dict(d_embed=16, tie_word_embeddings=False),
}


def adaptive_config(**overrides) -> TxlConfig:
    return tiny_config(vocab_size=V, mem_len=6, **overrides)


@pytest.fixture(params=list(VARIANTS), ids=list(VARIANTS))
def model(request):
    return TxlForCausalLM(adaptive_config(**VARIANTS[request.param])).eval()


def test_plain_config_keeps_plain_modules():
    model = TxlForCausalLM(tiny_config())
    assert type(model.transformer.word_emb) is torch.nn.Embedding and type(model.lm_head) is torch.nn.Linear
    assert not tiny_config().uses_adaptive() and tiny_config(d_embed=32).d_embed == 32


def test_modules_and_logits_are_normalised_log_probs(model):
    assert isinstance(model.transformer.word_emb, TxlAdaptiveEmbedding)
    assert isinstance(model.lm_head, TxlAdaptiveLogSoftmax)
    ids = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 7, V)
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(2, 7), atol=1e-5, rtol=0)
    assert (logits <= 0).all()


def test_adaptive_softmax_matches_direct_cluster_formula():
    """log p(x) = log p_head(cluster(x)) + log p_tail(x) computed by hand from the parameters (div_val 1)."""
    model = TxlForCausalLM(adaptive_config(cutoffs=[10, 30], tie_word_embeddings=False)).eval()
    head = model.lm_head
    h = torch.randn(5, 32)
    log_probs = head(h, model.transformer.word_emb)
    weight, bias = head.out_layers[0].weight, head.out_layers[0].bias
    head_lp = F.log_softmax(
        h @ torch.cat([weight[:10], head.cluster_weight]).T + torch.cat([bias[:10], head.cluster_bias]), -1
    )
    expected = [head_lp[:, :10]]
    for i, (start, end) in enumerate([(10, 30), (30, V)]):
        expected.append(head_lp[:, 10 + i, None] + F.log_softmax(h @ weight[start:end].T + bias[start:end], -1))
    torch.testing.assert_close(log_probs, torch.cat(expected, -1), atol=1e-6, rtol=1e-6)


def test_loss_is_nll_of_log_probs_with_shift_and_ignore_index(model):
    ids = torch.randint(0, V, (2, 8))
    labels = ids.clone()
    labels[0, 3] = -100
    out = model(ids, labels=labels)
    targets = labels[:, 1:].reshape(-1)
    expected = F.nll_loss(out.logits[:, :-1].reshape(-1, V), targets, ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    shifted = model(ids, shift_labels=F.pad(labels, (0, 1), value=-100)[:, 1:]).loss
    torch.testing.assert_close(shifted, out.loss)


def test_every_parameter_gets_a_gradient(model):
    """DDP with find_unused_parameters=False: a batch from the head cluster only must still reach every tail."""
    model.train()
    ids = torch.randint(0, 5, (2, 6))  # shortlist tokens only: no tail cluster is used by inputs or targets
    mems = model(ids).mems
    model(ids, mems=mems, labels=ids).loss.backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert not no_grad, no_grad


def test_embedding_matches_per_cluster_lookup():
    config = adaptive_config(cutoffs=[10, 30], div_val=4, d_embed=64)
    emb = TxlAdaptiveEmbedding(config)
    ids = torch.tensor([[0, 9, 10, 29, 30, 59]])
    out = emb(ids)[0]
    for position, token in enumerate(ids[0].tolist()):
        cluster = 0 if token < 10 else 1 if token < 30 else 2
        start = [0, 10, 30][cluster]
        expected = emb.emb_projs[cluster](emb.emb_layers[cluster].weight[token - start])
        torch.testing.assert_close(out[position], expected)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_generate_and_memory_continuation(variant):
    """generate() with the memory (mem_len 6, 12 new tokens: far past it) is the segment recurrence one token at a
    time, and the logits it reports are the forward's normalised log-probabilities. (It is not a full pass over the
    sequence: past mem_len the memory forgets the oldest tokens, which a full pass does not.)"""
    model = TxlForCausalLM(adaptive_config(init_std=0.5, **VARIANTS[variant])).eval()  # the context matters
    prompt = torch.randint(1, V, (2, 4))  # (no token 0: generate() would take the pad_token_id for left padding)
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
    sequence, logits = out.sequences, torch.stack(out.logits)  # [2, 16], [12, 2, V]
    assert sequence.shape == (2, 16) and torch.equal(sequence[:, 4:], logits.argmax(-1).T)
    with torch.no_grad():  # the memory matters past mem_len: each row's last steps' tokens fed alone predict otherwise
        alone = torch.stack([model(sequence[:, t : t + 1]).logits[:, -1] for t in range(4, 15)])  # [11, 2, V]
    assert ((alone - logits[1:])[7:].abs().amax(-1).amax(0) > 0.5).all()
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(12, 2), atol=1e-5, rtol=0)  # log-probs
    close = dict(atol=1e-3, rtol=0)  # measured <= 2.5e-4 on log-probs down to -55 (float32, different kernels)
    torch.testing.assert_close(logits, stepwise_logits(model, sequence, 4), **close)
    torch.testing.assert_close(logits, hand_memory_logits(model, sequence, 4), **close)
    full = full_pass_logits(model, sequence, 4)
    torch.testing.assert_close(logits[:4], full[:4], **close)  # while the memory holds every token
    assert (logits[8:] - full[8:]).abs().amax() > 0.1  # and past mem_len it has forgotten some


def test_save_load_round_trip_is_exact(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is TxlForCausalLM and loaded.config.cutoffs == model.config.cutoffs
    assert set(loaded.state_dict()) == set(model.state_dict())
    ids = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_resize_grows_the_tail_cluster(model):
    ids = torch.randint(0, V, (1, 6))
    with torch.no_grad():
        before = model(ids)
    model.resize_token_embeddings(V + 7)
    assert model.config.vocab_size == V + 7
    with torch.no_grad():
        after = model(ids)
        model(torch.tensor([[V + 6]]))  # new ids are accepted
    assert after.logits.shape[-1] == V + 7
    torch.testing.assert_close(after.logits.exp().sum(-1), torch.ones(1, 6), atol=1e-5, rtol=0)
    shortlist = (model.config.cutoffs or [V])[0]
    if model.config.cutoffs:  # head cluster untouched: its tokens keep their probabilities
        torch.testing.assert_close(after.logits[..., :shortlist], before.logits[..., :shortlist])
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_resize_below_last_cutoff_is_refused():
    model = TxlForCausalLM(adaptive_config(cutoffs=[10, 30]))
    with pytest.raises(NotImplementedError, match="last cluster"):
        model.resize_token_embeddings(25)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(cutoffs=[30, 10]), "cutoffs"),
        (dict(cutoffs=[10, V]), "cutoffs"),
        (dict(cutoffs=[10, 30], div_val=0), "div_val"),
        (dict(cutoffs=[10, 30, 40], div_val=4, d_embed=16), "div_val"),
        (dict(d_embed=0), "d_embed"),
        (dict(legacy_zero_mems=1), "legacy_zero_mems"),
    ],
)
def test_invalid_adaptive_fields_are_named(overrides, field):
    with pytest.raises(ValueError, match=field):
        adaptive_config(**overrides)


def test_legacy_zero_mems_attends_to_zeros_on_the_first_segment():
    """With the option, mems=None equals passing mem_len zero vectors explicitly; without it, it does not."""
    config = adaptive_config(cutoffs=[10, 30], legacy_zero_mems=True)
    model = TxlForCausalLM(config).eval()
    ids = torch.randint(0, V, (2, 5))
    zeros = [torch.zeros(2, config.mem_len, config.d_model)] * config.n_layer
    with torch.no_grad():
        implicit, explicit = model(ids), model(ids, mems=zeros)
        torch.testing.assert_close(implicit.logits, explicit.logits, atol=0, rtol=0)
        assert implicit.mems.mem_len == config.mem_len
        model.config.legacy_zero_mems = False
        assert not torch.allclose(model(ids).logits, implicit.logits, atol=1e-4)


def test_ddp_without_unused_parameters(tmp_path):
    """One-process gloo DDP with find_unused_parameters=False: a second step fails if any parameter went unused."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    ddp = None
    try:
        model = TxlForCausalLM(adaptive_config(cutoffs=[5, 20, 40], div_val=2, tie_word_embeddings=False))
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        ids = torch.randint(0, 5, (2, 6))  # shortlist tokens only
        for _ in range(2):
            ddp(ids, labels=ids).loss.backward()
    finally:
        # DDP's reducer holds the process group: freed after the group is destroyed, gloo's destructor could wait
        # forever on its threads (seen once in a full run). Free it first.
        del ddp
        gc.collect()
        dist.destroy_process_group()
