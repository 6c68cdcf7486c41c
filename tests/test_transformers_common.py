"""What transformers' own common model tests check, for hf_txl's three classes: ``generate(inputs_embeds=...)``
(GenerationTesterMixin's ``test_generate_from_inputs_embeds``, greedy and beam search) gives what generating from the
ids whose embeddings they are gives, with the memory carried after the embedded prompt; and a ``torch.export``
through transformers' DynamoExporter (``test_torch_export``, static and dynamic shapes) returns what the eager forward
returns, leaf by leaf (``get_leaf_tensors``, the exporters' own walk of an output) and with the same pytree
structure, although an eager forward in eval mode also fills the memory's inference store."""

import copy

import pytest
import torch
import torch.utils._pytree as pytree
from conftest import OTHER_ROUTE, left_padding, tiny_config
from transformers.exporters import DynamoConfig, DynamoExporter
from transformers.exporters.utils import get_leaf_tensors

from hf_txl import TxlCache, TxlForCausalLM, TxlForSequenceClassification, TxlModel

# init_std 0.5 gives logits up to ~10; routes through the same float32 kernels agree to ~1e-6 (other routes:
# conftest.OTHER_ROUTE).
SAME_ROUTE = dict(atol=1e-6, rtol=1e-6)


def make_model(cls=TxlForCausalLM, **overrides):
    torch.manual_seed(0)
    overrides.setdefault("mem_len", 32)
    overrides.setdefault("init_std", 0.5)  # a random model whose outputs depend on the context
    return cls(tiny_config(**overrides)).eval()


def assert_context_matters(model, ids):
    """On these weights the last position's logits change by more than 0.5 when the earlier tokens are removed: a
    generation step that lost the memory would give other scores."""
    with torch.no_grad():
        whole = model(ids, use_cache=False).logits[:, -1]
        alone = model(ids[:, -1:], use_cache=False).logits[:, -1]
    assert ((whole - alone).abs().amax(-1) > 0.5).all()


def assert_same_generation(a, b, tolerance):
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.scores) == len(b.scores) and len(a.logits) == len(b.logits)
    for x, y in zip(a.scores + a.logits, b.scores + b.logits):
        torch.testing.assert_close(x, y, **tolerance)


GENERATE = dict(
    do_sample=False, max_new_tokens=5, min_new_tokens=5, return_dict_in_generate=True, output_scores=True,
    output_logits=True,
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# generate() from inputs_embeds
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_beams", [1, 2], ids=["greedy", "beam_search"])
def test_generate_from_inputs_embeds_equals_generate_from_ids(num_beams):
    """transformers' test_generate_from_inputs_embeds: ids + their embeddings give the sequences and scores of the
    ids alone; the embeddings alone give the same new tokens; other embeddings give other scores. The prompt is
    left-padded in one row (transformers' test passes its attention mask)."""
    model = make_model()
    ids = torch.randint(2, 40, (2, 7))
    mask = left_padding(2, 7, 2)
    assert_context_matters(model, ids)
    kwargs = dict(GENERATE, num_beams=num_beams, attention_mask=mask)
    from_ids = model.generate(ids, **kwargs)
    assert from_ids.sequences.shape == (2, 7 + 5)
    embeds = model.get_input_embeddings()(ids)
    with_ids = model.generate(input_ids=ids, inputs_embeds=embeds, **kwargs)
    assert_same_generation(with_ids, from_ids, SAME_ROUTE)
    alone = model.generate(inputs_embeds=embeds, **kwargs)
    assert torch.equal(alone.sequences, from_ids.sequences[:, 7:])  # as for GPT-2: the new tokens only
    for x, y in zip(alone.scores + alone.logits, from_ids.scores + from_ids.logits):
        torch.testing.assert_close(x, y, **SAME_ROUTE)
    other = model.generate(input_ids=ids, inputs_embeds=torch.rand_like(embeds), **kwargs)
    assert all(not torch.allclose(x, y) for x, y in zip(other.logits, from_ids.logits))


def test_generate_from_inputs_embeds_feeds_the_prompt_once_then_one_token_per_step():
    """The embedded prompt is one forward call; every later call feeds only the new token with the memory carried,
    and each step's logits are those of a full pass over the whole text so far (the memory still holds it)."""
    model = make_model()
    ids = torch.randint(2, 40, (2, 6))
    assert_context_matters(model, ids)
    calls = []

    def record(module, args, kwargs):  # (shape of inputs_embeds, shape of input_ids, tokens in the memory)
        cache, embeds, step_ids = kwargs.get("cache"), kwargs.get("inputs_embeds"), kwargs.get("input_ids")
        shapes = [None if tensor is None else tuple(tensor.shape) for tensor in (embeds, step_ids)]
        calls.append((*shapes, cache.get_seq_length() if isinstance(cache, TxlCache) else 0))

    handle = model.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = model.generate(inputs_embeds=model.get_input_embeddings()(ids), **GENERATE)
    finally:
        handle.remove()
    assert calls == [((2, 6, 32), None, 0)] + [(None, (2, 1), 6 + step) for step in range(4)]
    text = torch.cat([ids, out.sequences], dim=1)  # [2, 6 + 5]
    with torch.no_grad():
        full = model(text[:, :-1], use_cache=False).logits[:, 5:]  # [2, 5, V]: the positions predicting the 5 tokens
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full, **OTHER_ROUTE)


@pytest.mark.parametrize("num_beams", [1, 2], ids=["greedy", "beam_search"])
def test_generate_from_inputs_embeds_continues_a_given_memory(num_beams):
    """As ids do, inputs_embeds follow a memory given as ``mems=`` (kept) or ``cache=``: all of them are read, though
    transformers would cut the memory's length off the front of embeddings that restart a cache."""
    model = make_model()
    context, prompt = torch.randint(2, 40, (2, 10)), torch.randint(2, 40, (2, 3))
    with torch.no_grad():
        memory = model(context).cache
        assert_context_matters(model, torch.cat([context, prompt], dim=1))
    kwargs = dict(GENERATE, num_beams=num_beams)
    from_ids = model.generate(prompt, mems=memory, **kwargs)
    embeds = model.get_input_embeddings()(prompt)
    from_embeds = model.generate(inputs_embeds=embeds, mems=memory, **kwargs)
    assert memory.get_seq_length() == 10
    assert torch.equal(from_embeds.sequences, from_ids.sequences[:, 3:])
    for x, y in zip(from_embeds.scores + from_embeds.logits, from_ids.scores + from_ids.logits):
        torch.testing.assert_close(x, y, **SAME_ROUTE)
    in_place = model.generate(inputs_embeds=embeds, cache=memory.fork(), **kwargs)
    assert torch.equal(in_place.sequences, from_embeds.sequences)
    without_memory = model.generate(inputs_embeds=embeds, **kwargs)
    assert not torch.allclose(without_memory.logits[0], from_embeds.logits[0])  # the memory was read


def test_generate_from_inputs_embeds_without_a_memory_is_refused():
    model = make_model(mem_len=0)
    embeds = model.get_input_embeddings()(torch.randint(2, 40, (1, 4)))
    with pytest.raises(ValueError, match="mem_len=0"):
        model.generate(inputs_embeds=embeds, max_new_tokens=2)


# ----------------------------------------------------------------------------------------------------
# torch.export through transformers' DynamoExporter
# ----------------------------------------------------------------------------------------------------


def assert_same_outputs(exported_out, eager_out):
    """transformers' test_torch_export compares ``get_leaf_tensors`` of both outputs (a walk of attributes); the
    pytree structures must agree too (that is what the exported program unflattens to)."""
    exported_leaves, eager_leaves = get_leaf_tensors(exported_out), get_leaf_tensors(eager_out)
    assert sorted(exported_leaves) == sorted(eager_leaves)
    torch.testing.assert_close(exported_leaves, eager_leaves, **OTHER_ROUTE)
    assert pytree.tree_structure(exported_out) == pytree.tree_structure(eager_out)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("cls", [TxlModel, TxlForCausalLM, TxlForSequenceClassification])
def test_dynamo_exporter_output_matches_eager_leaf_by_leaf(cls, dynamic):
    model = make_model(cls, mem_len=8)
    inputs = {"input_ids": torch.randint(2, 40, (2, 6)), "attention_mask": left_padding(2, 6, 2)}
    with torch.no_grad():
        eager = model(**copy.deepcopy(inputs))
    assert eager.cache.store is not None and eager.cache.kv is not None  # eval mode filled the inference store
    names = sorted(get_leaf_tensors(eager))
    assert names == sorted(
        ["cache.padding_mask", "cache.layers.0.hidden", "cache.layers.1.hidden",
         "last_hidden_state" if cls is TxlModel else "logits"]
    )  # fmt: skip
    exported = DynamoExporter().export(model, copy.deepcopy(inputs), DynamoConfig(dynamic=dynamic))
    assert_same_outputs(exported(**copy.deepcopy(inputs)), eager)
    if dynamic:  # another batch size and length (the program guards the length below mem_len)
        other = {"input_ids": torch.randint(2, 40, (3, 4)), "attention_mask": left_padding(3, 4, 1)}
        with torch.no_grad():
            eager = model(**copy.deepcopy(other))
        assert_same_outputs(exported(**copy.deepcopy(other)), eager)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_dynamo_exporter_with_a_memory_matches_eager_leaf_by_leaf(dynamic):
    """With a memory as input (passed as ``cache=``, updated in place by the eager forward)."""
    model = make_model(mem_len=6)
    ids = torch.randint(2, 40, (2, 12))
    with torch.no_grad():
        memory = model(ids[:, :6]).cache.without_cache()
        assert_context_matters(model, ids[:, :8])
        inputs = {"input_ids": ids[:, 6:], "cache": memory}
        eager = model(**copy.deepcopy(inputs))
    assert eager.cache.store is not None
    exported = DynamoExporter().export(model, copy.deepcopy(inputs), DynamoConfig(dynamic=dynamic))
    out = exported(**copy.deepcopy(inputs))
    assert_same_outputs(out, eager)
    assert isinstance(out.cache, TxlCache) and out.cache.mem_len == 6
