"""generate(): the memory is the past state; results equal full recomputation.

Every comparison is of logits (``output_logits``) on weights where the context matters (init_std 0.5, checked by
``assert_context_matters``): at the default init_std 0.02 a tiny model's greedy tokens do not depend on the memory, so
equal tokens would prove nothing.
"""

import copy

import pytest
import torch
from conftest import assert_context_matters, full_pass_logits, hand_memory_logits, stepwise_logits, tiny_config
from transformers.generation.streamers import BaseStreamer

from hf_txl import TxlForCausalLM

LOGITS = dict(return_dict_in_generate=True, output_logits=True)
# float32 rounding of different kernels (one-row steps vs whole sequences): measured <= 6e-5 on logits up to ~10;
# removing the context moves them by more than 0.5 (assert_context_matters)
ATOL, RTOL = 3e-4, 0


def make_model(**overrides):
    return TxlForCausalLM(tiny_config(**overrides)).eval()


def step_logits(out) -> torch.Tensor:
    """generate()'s raw logits, one per new token: [N, B, V]."""
    return torch.stack(out.logits)


def record_input_lengths(model):
    lengths = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    return lengths, hook


def test_greedy_with_memory_feeds_one_token_and_equals_full_recomputation():
    model = make_model(mem_len=64, init_std=0.5)
    prompt = torch.randint(1, 40, (2, 9))
    lengths, hook = record_input_lengths(model)
    with_memory = model.generate(prompt, max_new_tokens=20, do_sample=False, **LOGITS)
    hook.remove()
    assert lengths == [9] + [1] * 19  # prefix once, then only the new token each step
    sequence, logits = with_memory.sequences, step_logits(with_memory)  # [2, 29], [20, 2, V]
    assert_context_matters(model, sequence)
    assert torch.equal(sequence[:, 9:], logits.argmax(-1).T)  # greedy
    # The memory (mem_len 64) holds all 28 earlier tokens: one forward pass over the sequence, no memory at all ...
    torch.testing.assert_close(logits, full_pass_logits(model, sequence, 9), atol=ATOL, rtol=RTOL)
    # ... and generate() without its cache, which recomputes the whole sequence at every step.
    recomputed = model.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=False, **LOGITS)
    assert torch.equal(sequence, recomputed.sequences)
    torch.testing.assert_close(logits, step_logits(recomputed), atol=ATOL, rtol=RTOL)


def test_mem_len_zero_generates_by_recomputation():
    model = make_model(mem_len=64, init_std=0.5)
    no_memory = TxlForCausalLM(copy.deepcopy(model.config)).eval()
    no_memory.config.mem_len = 0
    no_memory.load_state_dict(model.state_dict())
    prompt = torch.randint(1, 40, (2, 5))
    lengths, hook = record_input_lengths(no_memory)
    out = no_memory.generate(prompt, max_new_tokens=6, do_sample=False, **LOGITS)
    hook.remove()
    assert lengths == list(range(5, 11))  # the whole sequence at every step
    assert_context_matters(no_memory, out.sequences)
    torch.testing.assert_close(step_logits(out), full_pass_logits(model, out.sequences, 5), atol=ATOL, rtol=RTOL)
    with_memory = model.generate(prompt, max_new_tokens=6, do_sample=False, **LOGITS)
    assert torch.equal(out.sequences, with_memory.sequences)
    torch.testing.assert_close(step_logits(out), step_logits(with_memory), atol=ATOL, rtol=RTOL)


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    model = make_model(mem_len=64, init_std=0.5)
    prompts = [torch.randint(1, 40, (n,)) for n in (3, 8, 5)]
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = prompt
        attention_mask[row, width - len(prompt) :] = 1
    batched = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=15, do_sample=False, **LOGITS)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=15, do_sample=False, **LOGITS)
        assert_context_matters(model, alone.sequences)  # so attending to the padding would change the logits
        assert torch.equal(batched.sequences[row, width:], alone.sequences[0, len(prompt) :])
        torch.testing.assert_close(step_logits(batched)[:, row], step_logits(alone)[:, 0], atol=ATOL, rtol=RTOL)
        # and each prompt alone equals one pass over its sequence (18 tokens or fewer, all in the memory)
        reference = full_pass_logits(model, alone.sequences, len(prompt))
        torch.testing.assert_close(step_logits(alone), reference, atol=ATOL, rtol=RTOL)


def test_sampling_is_seeded_and_memory_matches_recomputation():
    model = make_model(mem_len=64, init_std=0.5)
    prompt = torch.randint(1, 40, (2, 4))
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        runs.append(
            model.generate(
                prompt, do_sample=True, top_k=10, top_p=0.9, temperature=0.8, max_new_tokens=12,
                num_return_sequences=3, use_cache=use_cache, **LOGITS,
            )
        )  # fmt: skip
    sequences = runs[0].sequences
    assert sequences.shape == (6, 16)
    assert torch.equal(sequences, runs[1].sequences)
    torch.testing.assert_close(step_logits(runs[0]), step_logits(runs[1]), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(step_logits(runs[0]), full_pass_logits(model, sequences, 4), atol=ATOL, rtol=RTOL)
    assert_context_matters(model, sequences)
    assert torch.equal(sequences[:, :4], prompt.repeat_interleave(3, 0))  # sequences 0-2 continue prompt 0
    for rows in (sequences[:3, 4:], sequences[3:, 4:]):  # it did sample, not repeat one sequence per prompt
        assert len({tuple(row) for row in rows.tolist()}) > 1


def test_beam_search_reorders_memory():
    model = make_model(mem_len=64, init_std=0.5)  # larger weights: the past changes the beams' scores markedly
    prompt = torch.randint(1, 40, (2, 5))
    kwargs = dict(num_beams=4, num_return_sequences=2, max_new_tokens=10, do_sample=False, early_stopping=True)
    kwargs.update(return_dict_in_generate=True, output_scores=True)
    with_memory = model.generate(prompt, **kwargs)
    recomputed = model.generate(prompt, use_cache=False, **kwargs)
    assert with_memory.sequences.shape == (4, 15)
    assert torch.equal(with_memory.sequences, recomputed.sequences)
    torch.testing.assert_close(with_memory.sequences_scores, recomputed.sequences_scores, atol=1e-5, rtol=1e-5)
    # a returned hypothesis moved between beam slots after the first step, so its memory rows had to follow it
    slots = with_memory.beam_indices[:, 1:10]
    assert (slots[:, 1:] != slots[:, :-1]).any()


class CollectingStreamer(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_streamer_receives_prompt_then_every_new_token():
    model = make_model()
    prompt = torch.randint(1, 40, (1, 4))
    streamer = CollectingStreamer()
    out = model.generate(prompt, max_new_tokens=7, do_sample=False, streamer=streamer)
    assert streamer.ended
    assert streamer.chunks[0] == prompt[0].tolist()
    assert [c[0] for c in streamer.chunks[1:]] == out[0, 4:].tolist()


def test_generating_far_beyond_mem_len_keeps_memory_bounded():
    model = make_model(mem_len=8, init_std=0.5)
    prompt = torch.randint(1, 40, (2, 3))
    sizes = []
    hook = model.register_forward_hook(lambda module, args, output: sizes.append(output.mems.mem_len))
    out = model.generate(prompt, max_new_tokens=60, do_sample=False, min_new_tokens=60, **LOGITS)
    hook.remove()
    sequence, logits = out.sequences, step_logits(out)
    assert sequence.shape == (2, 63)
    assert max(sizes) == 8 and sizes[-1] == 8
    assert torch.equal(sequence[:, 3:], logits.argmax(-1).T)  # greedy
    assert_context_matters(model, sequence[:, -9:])  # the last 8 tokens (the memory) change the last prediction
    # The segment recurrence one token at a time: with the model's cache, and with the memory kept by hand.
    torch.testing.assert_close(logits, stepwise_logits(model, sequence, 3), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(logits, hand_memory_logits(model, sequence, 3), atol=ATOL, rtol=RTOL)
    # Past mem_len the memory forgets: a full pass (which remembers everything) agrees only while nothing is dropped.
    full = full_pass_logits(model, sequence, 3)
    torch.testing.assert_close(logits[:7], full[:7], atol=ATOL, rtol=RTOL)  # 3 + 7 - 2 <= mem_len
    assert (logits[10:] - full[10:]).abs().amax() > 0.5


def test_generate_continues_from_user_memory():
    model = make_model(mem_len=64, init_std=0.5)
    context = torch.randint(1, 40, (2, 10))
    prompt = torch.randint(1, 40, (2, 3))
    with torch.no_grad():
        mems = model(context).mems
    continued = model.generate(prompt, mems=mems, max_new_tokens=5, do_sample=False, **LOGITS)
    whole = model.generate(torch.cat([context, prompt], 1), max_new_tokens=5, do_sample=False, **LOGITS)
    assert torch.equal(continued.sequences[:, 3:], whole.sequences[:, 13:])
    torch.testing.assert_close(step_logits(continued), step_logits(whole), atol=ATOL, rtol=RTOL)
    reference = full_pass_logits(model, whole.sequences, 13)  # 18 tokens, all in the memory
    torch.testing.assert_close(step_logits(continued), reference, atol=ATOL, rtol=RTOL)
    reference = stepwise_logits(model, continued.sequences, 3, mems=mems)
    torch.testing.assert_close(step_logits(continued), reference, atol=ATOL, rtol=RTOL)
    # the memory is used: without it, the same prompt gives other logits
    alone = model.generate(prompt, max_new_tokens=5, do_sample=False, **LOGITS)
    assert (step_logits(alone)[0] - step_logits(continued)[0]).abs().amax(-1).min() > 0.5


@pytest.mark.parametrize("num_return_sequences", [2, 3])
def test_user_memory_is_expanded_for_several_sequences(num_return_sequences):
    n = num_return_sequences
    model = make_model(mem_len=64, init_std=0.5)  # larger weights: the memory changes the tokens generated
    # Two rows with different contexts but the same prompt: only the memory tells them apart, so every expanded
    # sequence must carry its own row's memory (and not, say, row 0's) to match the references below.
    context = torch.randint(1, 40, (2, 6))
    prompt = torch.randint(1, 40, (1, 2)).expand(2, 2)
    whole = torch.cat([context, prompt], 1)
    with torch.no_grad():
        mems = model(context).mems
    report = dict(max_new_tokens=4, return_dict_in_generate=True, output_logits=True)
    single = model.generate(prompt, mems=mems, do_sample=False, **report)
    recomputed = model.generate(whole, use_cache=False, do_sample=False, **report)
    assert torch.equal(single.sequences[:, 2:], recomputed.sequences[:, 8:])
    for step in range(4):  # float32 rounding of different kernels (one-row steps vs whole sequences), logits ~10
        torch.testing.assert_close(single.logits[step], recomputed.logits[step], atol=5e-5, rtol=1e-5)
    first_step = single.logits[0]
    assert (first_step[0] - first_step[1]).abs().max().item() > 1e-3  # the memory does change the predictions
    assert not torch.equal(single.sequences[0], single.sequences[1])  # and the tokens generated from them

    # transformers refuses num_return_sequences > 1 with do_sample=False; sampling from the top-1 token is greedy
    out = model.generate(prompt, mems=mems, do_sample=True, top_k=1, num_return_sequences=n, **report)
    assert out.sequences.shape == (2 * n, 6)
    for row in range(2):
        for k in range(n):
            assert torch.equal(out.sequences[row * n + k], single.sequences[row])
            assert torch.equal(out.sequences[row * n + k, 2:], recomputed.sequences[row, 8:])
            for step in range(4):  # raw logits, before top-k (float32 rounding differs with the batch size)
                torch.testing.assert_close(out.logits[step][row * n + k], single.logits[step][row], atol=5e-5, rtol=0)

    # beam search expands the memory the same way: n beams continuing the memory = n beams over the whole context
    beams = dict(num_beams=n, num_return_sequences=n, do_sample=False, max_new_tokens=4, return_dict_in_generate=True)
    from_memory = model.generate(prompt, mems=mems, output_scores=True, **beams)
    from_context = model.generate(whole, use_cache=False, output_scores=True, **beams)
    assert from_memory.sequences.shape == (2 * n, 6)
    assert torch.equal(from_memory.sequences[:, :2], prompt.repeat_interleave(n, 0))
    assert torch.equal(from_memory.sequences[:, 2:], from_context.sequences[:, 8:])
    torch.testing.assert_close(from_memory.sequences_scores, from_context.sequences_scores, atol=1e-5, rtol=1e-5)
    for row in range(2):  # n different hypotheses per row, so the comparison above is one per beam
        assert len({tuple(s) for s in from_memory.sequences[row * n : (row + 1) * n].tolist()}) == n
    scores = from_memory.sequences_scores.view(2, n)
    assert (scores[0] - scores[1]).abs().max().item() > 1e-4  # the two rows' memories lead to different beams
