"""The memory as a transformers ``Cache``: ``cache=`` / ``mems=`` semantics, the public Cache protocol that
``generate()`` uses (beam search, ``num_return_sequences``, ``crop`` for assisted and prompt-lookup decoding,
streamers), export with ``torch.export``, and clear errors for bad model input."""

import copy
import inspect
import threading
from unittest.mock import patch

import pytest
import torch
from conftest import OTHER_ROUTE, tiny_config
from transformers import Cache, DynamicCache, GenerationMixin, TextIteratorStreamer

from hf_txl import TxlCache, TxlCharTokenizer, TxlConfig, TxlForCausalLM, TxlModel
from hf_txl.modeling_txl import TxlLayer


def make_model(**overrides):
    torch.manual_seed(0)
    overrides.setdefault("mem_len", 16)
    overrides.setdefault("init_std", 0.5)  # a random model whose greedy tokens depend on the context
    return TxlForCausalLM(tiny_config(**overrides)).eval()


def recompute_greedy(model, prompt, steps):
    """Greedy tokens by recomputing the whole sequence at every step (no memory at all): the reference."""
    ids = prompt
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


# ----------------------------------------------------------------------------------------------------
# cache= and mems=
# ----------------------------------------------------------------------------------------------------


def test_cache_is_a_transformers_cache_updated_in_place_and_mems_is_its_alias():
    model = make_model()
    ids = torch.randint(1, 40, (2, 9))
    with torch.no_grad():
        first = model(ids[:, :4])
        cache = first.cache
        assert isinstance(cache, Cache) and first.mems is cache
        assert cache.get_seq_length() == 4 and cache.mem_len == 4
        second = model(ids[:, 4:], cache=cache)
        assert second.cache is cache and second.mems is cache  # updated in place, as transformers' caches are
        assert cache.get_seq_length() == 9
        whole = model(ids, use_cache=False).logits
    # init_std 0.5 gives logits up to ~10: each float32 route is 1e-5 to 2.5e-5 from a float64 forward.
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), whole, atol=5e-5, rtol=1e-5)


def test_mems_alias_leaves_the_given_memory_as_it_was():
    model = make_model()
    ids = torch.randint(1, 40, (2, 9))
    with torch.no_grad():
        memory = model(ids[:, :4]).cache
        before = [m.clone() for m in memory]
        out = model(ids[:, 4:], mems=memory)
        assert out.cache is not memory and memory.get_seq_length() == 4
        assert all(torch.equal(m, b) for m, b in zip(memory, before))
        again = model(ids[:, 4:], mems=memory)  # the same memory continued twice gives the same result
    torch.testing.assert_close(out.logits, again.logits, atol=0, rtol=0)


def test_cache_and_mems_together_and_foreign_caches_are_refused():
    model = make_model()
    ids = torch.randint(1, 40, (1, 4))
    with torch.no_grad():
        memory = model(ids).cache
        with pytest.raises(ValueError, match="not both"):
            model(ids, cache=memory, mems=memory)
        dynamic = DynamicCache()
        dynamic.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), 0)
        with pytest.raises(ValueError, match="DynamicCache"):
            model(ids, cache=dynamic)
        # an empty transformers cache (what generate() starts with) is an empty memory
        torch.testing.assert_close(model(ids, cache=DynamicCache()).logits, model(ids).logits, atol=0, rtol=0)


def test_use_cache_false_on_the_config_returns_no_cache_and_leaves_a_given_one():
    model = make_model(use_cache=False)
    assert model.config.use_cache is False
    ids = torch.randint(1, 40, (1, 6))
    with torch.no_grad():
        assert model(ids).cache is None
        memory = model(ids, use_cache=True).cache
        out = model(ids, cache=memory)
    assert out.cache is None and memory.get_seq_length() == 6


def test_empty_cache_from_config_and_plain_lists():
    model = make_model()
    ids = torch.randint(1, 40, (2, 5))
    with torch.no_grad():
        empty = TxlCache(config=model.config)
        assert empty.get_seq_length() == 0 and len(empty) == model.config.n_layer
        out = model(ids, cache=empty)
        assert out.cache is empty and empty.get_seq_length() == 5
        listed = model(ids, mems=[m.clone() for m in empty]).logits
        # (the list has no cached projections: its keys come from another float32 kernel, init_std 0.5 logits)
        torch.testing.assert_close(listed, model(ids, mems=empty).logits, atol=1e-5, rtol=1e-5)


def test_crop_rolls_the_memory_back_to_what_recomputation_gives():
    model = make_model(mem_len=6)
    ids = torch.randint(1, 40, (2, 14))
    with torch.no_grad():
        cache = model(ids[:, :8]).cache
        model(ids[:, 8:12], cache=cache)  # 4 more tokens: 4 positions slid out of the memory
        cache.crop(-3)
        assert cache.get_seq_length() == 9
        # as if only token 8 had followed the first segment (query 8 saw the same keys either way)
        reference = model(ids[:, 8:9], mems=model(ids[:, :8]).cache).cache.without_cache()
        for kept, expected in zip(cache, reference):
            torch.testing.assert_close(kept, expected, atol=1e-5, rtol=1e-5)
        following = model(ids[:, 9:11], cache=cache).logits
        expected = model(ids[:, 9:11], cache=reference).logits
    torch.testing.assert_close(following, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="negative"):
        cache.crop(2)
    cache.crop(-10)  # the store still holds every position since the start: back to one token
    assert cache.get_seq_length() == 1 and torch.equal(cache[0], model(ids[:, :1]).cache[0])
    # a memory given as tensors only has its own positions: it cannot go back before them
    with torch.no_grad():
        given = TxlCache([m.clone() for m in model(ids[:, :8]).cache], seen_tokens=20)
        model(ids[:, 8:10], cache=given)
    given.crop(-2)
    with pytest.raises(ValueError, match="no longer keeps"):
        given.crop(-1)


def test_crop_of_a_training_memory_says_what_is_needed():
    model = make_model()
    model.train()
    cache = model(torch.randint(1, 40, (1, 5))).cache
    assert not cache.is_croppable
    with pytest.raises(ValueError, match="eval"):
        cache.crop(-1)


def test_reorder_select_and_repeat_are_in_place_on_rows():
    model = make_model()
    with torch.no_grad():
        cache = model(torch.randint(1, 40, (3, 5))).cache
    rows = [m.clone() for m in cache]
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    assert all(torch.equal(m, r[[2, 0, 1]]) for m, r in zip(cache, rows))
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 6 and torch.equal(cache[0][1], rows[0][2])
    cache.batch_select_indices(torch.tensor([0, 5]))
    assert torch.equal(cache[0], rows[0][[2, 1]])
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.is_empty


def test_deepcopy_of_a_cache_is_an_independent_memory():
    model = make_model()
    ids = torch.randint(1, 40, (1, 8))
    with torch.no_grad():
        cache = model(ids[:, :4]).cache
        branch = copy.deepcopy(cache)
        model(ids[:, 4:6], cache=cache)
        out_branch = model(ids[:, 4:], cache=branch).logits
        expected = model(ids[:, 4:], mems=model(ids[:, :4]).cache).logits
    torch.testing.assert_close(out_branch, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# generate() through the public protocol
# ----------------------------------------------------------------------------------------------------


def test_no_private_generation_hook_is_overridden():
    """generate() must work through the public Cache protocol only: none of these private GenerationMixin methods may
    be overridden (they are what broke the transformers 4.x port), and the public ones relied on must exist."""
    for name in ("_update_model_kwargs_for_generation", "_expand_inputs_for_generation", "_reorder_cache",
                 "_supports_default_dynamic_cache"):  # fmt: skip
        owners = [cls for cls in TxlForCausalLM.__mro__ if name in vars(cls)]
        assert all(cls.__module__.startswith("transformers") for cls in owners), (name, owners)
    parameters = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    assert {"cache", "next_sequence_length", "is_first_iteration"} <= set(parameters)
    for name in ("get_seq_length", "reorder_cache", "batch_repeat_interleave", "batch_select_indices", "crop"):
        assert callable(getattr(Cache, name)), name
    # the one private hook hf_txl overrides (README: the transformers surface): it must still exist upstream
    from transformers import PreTrainedModel

    assert callable(getattr(PreTrainedModel, "_can_set_attn_implementation", None))


@pytest.mark.parametrize("mode", ["prompt_lookup", "assistant"])
def test_assisted_and_prompt_lookup_decoding_equal_greedy(mode):
    """Token for token while the text fits in the memory (beyond it, a draft token attends to up to mem_len + draft
    length keys, one generated token at a time to mem_len + 1: Transformer-XL's outputs depend on the segmentation)."""
    model = make_model(mem_len=40)
    pattern = torch.randint(1, 40, (1, 5))
    prompt = torch.cat([pattern, pattern, pattern[:, :2]], dim=1)  # repeats, so the lookup proposes drafts
    if mode == "prompt_lookup":
        extra = {"prompt_lookup_num_tokens": 3}
    else:
        torch.manual_seed(1)
        extra = {"assistant_model": TxlForCausalLM(tiny_config(mem_len=40, n_layer=1, init_std=0.5)).eval()}
    out = model.generate(prompt, max_new_tokens=20, do_sample=False, **extra)
    plain = model.generate(prompt, max_new_tokens=20, do_sample=False)
    assert torch.equal(out, plain)
    assert torch.equal(out, recompute_greedy(model, prompt, 20))


def test_an_assistant_with_the_models_weights_drafts_its_tokens_and_each_is_fed_once():
    """The assistant's memory holds the text once (transformers hands it the whole text at every call; it must feed
    only what follows its memory), so with the model's own weights it drafts the model's greedy tokens: every draft
    is accepted and the model reads each token once."""
    model = make_model(mem_len=40)
    assistant = copy.deepcopy(model)
    prompt = torch.randint(1, 40, (1, 12))
    fed = []
    hook = model.register_forward_pre_hook(lambda m, a, k: fed.append(k["input_ids"].shape[1]), with_kwargs=True)
    out = model.generate(prompt, max_new_tokens=20, do_sample=False, assistant_model=assistant)
    hook.remove()
    assert torch.equal(out, recompute_greedy(model, prompt, 20))
    assert len(fed) > 1 and sum(fed) == 12 + 20 - 1, fed  # a rejected draft would be fed again


@pytest.mark.parametrize("mode", ["prompt_lookup", "assistant"])
def test_assisted_decoding_rolls_back_drafts_beyond_the_memory(mode):
    """Past ``mem_len`` a rejected draft is rolled back with positions that slid out of the memory (kept while
    recording the past); the text up to the memory's length equals plain greedy decoding."""
    model = make_model(mem_len=16)
    pattern = torch.randint(1, 40, (1, 3))
    prompt = torch.cat([pattern, pattern], dim=1)  # 6 tokens
    torch.manual_seed(1)
    if mode == "prompt_lookup":
        extra = {"prompt_lookup_num_tokens": 4}
    else:
        extra = {"assistant_model": TxlForCausalLM(tiny_config(mem_len=16, n_layer=1, init_std=0.5)).eval()}
    rolled_back = []  # (tokens seen, tokens removed) of every roll-back
    crop = TxlCache.crop
    with patch.object(TxlCache, "crop", lambda self, n: (rolled_back.append((self.seen_tokens, -n)), crop(self, n))):
        out = model.generate(prompt, max_new_tokens=100, do_sample=False, **extra)
    assert out.shape == (1, 106)
    assert any(seen - removed >= 16 and removed for seen, removed in rolled_back), rolled_back
    assert torch.equal(out[:, :17], model.generate(prompt, max_new_tokens=11, do_sample=False))


def test_streamer_receives_the_generated_tokens():
    model = make_model()
    prompt = torch.randint(1, 40, (1, 3))

    class Collect:
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.chunks.append("end")

    streamer = Collect()
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, streamer=streamer)
    assert streamer.chunks[0] == prompt.flatten().tolist() and streamer.chunks[-1] == "end"
    assert sum(streamer.chunks[1:-1], []) == out[0, 3:].tolist()

    # transformers' TextIteratorStreamer, as documented: generate() in a thread, the text read as it comes (letters
    # and digits at once). A character tokenizer whose 40 ids are the model's vocabulary (<unk>, <pad>, 38 characters).
    tokenizer = TxlCharTokenizer.from_corpus(["abcdefghijklmnopqrstuvwxyz0123456789 ."], add_eos=False)
    assert len(tokenizer) == model.config.vocab_size
    text_streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=30)
    results = []
    thread = threading.Thread(
        target=lambda: results.append(
            model.generate(prompt, max_new_tokens=24, do_sample=False, streamer=text_streamer)
        )
    )
    thread.start()
    pieces = list(text_streamer)  # (raises queue.Empty if generate() stops feeding the streamer)
    thread.join()
    generated = results[0][0, 3:]
    assert len(generated) == 24 and len(set(generated.tolist())) > 3
    assert "".join(pieces) == tokenizer.decode(generated) and len([piece for piece in pieces if piece]) > 1


def test_generate_continues_a_cache_in_place_and_a_mems_alias_unchanged():
    model = make_model(mem_len=32)
    context, prompt = torch.randint(1, 40, (1, 10)), torch.randint(1, 40, (1, 3))
    whole = recompute_greedy(model, torch.cat([context, prompt], 1), 5)
    with torch.no_grad():
        cache = model(context).cache
    kept = [m.clone() for m in cache]
    via_mems = model.generate(prompt, mems=cache, max_new_tokens=5, do_sample=False)
    assert cache.get_seq_length() == 10 and all(torch.equal(m, k) for m, k in zip(cache, kept))
    via_cache = model.generate(prompt, cache=cache, max_new_tokens=5, do_sample=False)
    assert torch.equal(via_mems[:, 3:], whole[:, 13:]) and torch.equal(via_cache, via_mems)
    assert cache.get_seq_length() == 10 + 3 + 4  # the last generated token is not fed back


def test_generate_rejects_an_attention_mask_of_the_wrong_shape():
    model = make_model()
    prompt = torch.randint(1, 40, (2, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(prompt, attention_mask=torch.ones(2, 7, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(prompt, attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=2)


# ----------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------


def test_torch_export_of_a_model_with_memory_equals_eager_on_two_segments():
    model = make_model(mem_len=6)
    ids = torch.randint(1, 40, (2, 18))
    with torch.no_grad():
        start = model(ids[:, :6]).cache.without_cache()  # a full memory: the exported program's input structure
        exported = torch.export.export(model, (), {"input_ids": ids[:, 6:12], "cache": copy.deepcopy(start)})
        program = exported.module()
        eager_1 = model(ids[:, 6:12], mems=start)
        export_1 = program(input_ids=ids[:, 6:12], cache=copy.deepcopy(start))
        eager_2 = model(ids[:, 12:], mems=eager_1.cache)
        export_2 = program(input_ids=ids[:, 12:], cache=export_1.cache)
    for eager, out in ((eager_1, export_1), (eager_2, export_2)):
        torch.testing.assert_close(out.logits, eager.logits, atol=1e-5, rtol=1e-5)
        assert isinstance(out.cache, TxlCache)
        for a, b in zip(out.cache, eager.cache):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_transformers_dynamo_exporter_exports_the_model_with_memory():
    from transformers.exporters import DynamoConfig, DynamoExporter

    model = make_model(mem_len=6)
    ids = torch.randint(1, 40, (1, 12))
    with torch.no_grad():
        start = model(ids[:, :6]).cache.without_cache()
        exported = DynamoExporter().export(
            model, {"input_ids": ids[:, 6:].clone(), "cache": copy.deepcopy(start)}, DynamoConfig()
        )
        out = exported(input_ids=ids[:, 6:], cache=copy.deepcopy(start))
        eager = model(ids[:, 6:], mems=start)
    torch.testing.assert_close(out.logits, eager.logits, **OTHER_ROUTE)  # 1.5e-5 apart seen on one thread
    for a, b in zip(out.cache, eager.cache):
        torch.testing.assert_close(a, b, **OTHER_ROUTE)


# ----------------------------------------------------------------------------------------------------
# transformers v5 structure and bad input
# ----------------------------------------------------------------------------------------------------


def test_layers_are_gradient_checkpointing_layers_and_every_n_layers_works():
    config = tiny_config(mem_len=4, n_layer=4, dropout=0.0)
    reference = TxlForCausalLM(config)
    model = copy.deepcopy(reference)
    assert all(isinstance(layer, TxlLayer) for layer in model.transformer.layers)
    ids = torch.randint(1, 40, (2, 6))
    memory = reference(ids).cache
    model.train(), reference.train()
    model.activation_checkpointing_enable({"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in model.transformer.layers)
    for net in (reference, model):
        net(ids, mems=memory, labels=ids).loss.backward()
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(input_ids=torch.rand(2, 4)), "input_ids.*dtype"),
        (dict(input_ids=torch.ones(2, 4, dtype=torch.long), labels=torch.ones(2, 5, dtype=torch.long)), "labels"),
        (dict(input_ids=torch.ones(2, 4, dtype=torch.long), labels=torch.full((2, 4), 99)), "labels.*vocabulary"),
        (dict(input_ids=torch.ones(2, 4, dtype=torch.long), shift_labels=torch.full((2, 4), -5)), "shift_labels"),
        (dict(input_ids=torch.ones(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 3)), "attention_mask"),
    ],
)
def test_bad_model_input_names_the_argument(kwargs, match):
    model = make_model()
    with pytest.raises(ValueError, match=match):
        model(**kwargs)


def test_labels_with_ignore_index_are_accepted():
    model = make_model()
    ids = torch.randint(1, 40, (2, 4))
    labels = ids.clone()
    labels[:, :2] = -100
    loss = model(ids, labels=labels).loss
    assert torch.isfinite(loss)


def test_config_declares_use_cache_and_tie_word_embeddings():
    config = TxlConfig()
    assert config.use_cache is True and config.tie_word_embeddings is True
    assert "use_cache" in config.to_dict()
    assert TxlModel(tiny_config(mem_len=0))(torch.ones(1, 3, dtype=torch.long)).cache is None
