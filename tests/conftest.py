"""Shared fixtures: tiny configurations that run in milliseconds on a CPU."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hf_txl import TxlConfig  # noqa: E402

# float32 results of two routes through the maths (other summation orders: one segment against several, export against
# eager, fused against reference, a merged LoRA weight): 1.0-2.5e-5 apart seen, on logits up to ~10
OTHER_ROUTE = dict(atol=5e-5, rtol=1e-5)


def tiny_config(**overrides) -> TxlConfig:
    """A 2-layer model of a few thousand parameters, dropout off so that eval and train agree."""
    values = dict(
        vocab_size=40,
        d_model=32,
        n_layer=2,
        n_head=4,
        d_head=8,
        d_inner=64,
        mem_len=64,
        dropout=0.0,
        dropatt=0.0,
        pad_token_id=0,
    )
    values.update(overrides)
    return TxlConfig(**values)


def eager_and_fast(implementation: str, **overrides):
    """Two models with the same weights from ``tiny_config(**overrides)``: the eager reference and
    ``attn_implementation=implementation`` (the fast path under test)."""
    import copy

    from hf_txl import TxlForCausalLM

    config = tiny_config(**overrides)
    eager = TxlForCausalLM._from_config(copy.deepcopy(config), attn_implementation="eager")
    fast = TxlForCausalLM._from_config(copy.deepcopy(config), attn_implementation=implementation)
    fast.load_state_dict(eager.state_dict())
    return eager, fast


def worker_port(base: int) -> int:
    """A TCP port for a launched multi-process run: ``base`` offset by the pytest-xdist worker (gw0, gw1, ...), so that
    tests running side by side (``pytest -n 2``) never share one."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return base + 1000 * int(worker[2:] or 0)


def left_padding(batch: int, length: int, pad: int) -> torch.Tensor:
    """An attention mask [batch, length] of ones, with the first ``pad`` positions of row 0 padding."""
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :pad] = 0
    return mask


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def run_without_hf_txl(script: str, *args, tmp_path) -> dict:
    """Run ``script`` in a fresh interpreter where hf_txl cannot be imported (a user who only has the model
    directory), offline, with its own transformers module cache; return the JSON object it prints last."""
    import json
    import subprocess
    import sys

    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HOME": str(tmp_path / "home"),
    }
    blocker = 'import sys\nsys.modules["hf_txl"] = None  # only the code stored in the model directory can run\n'
    command = [sys.executable, "-c", blocker + script, *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- references for generate(): the logits each step should give ------------------------------------------------


def stepwise_logits(model, sequence: torch.Tensor, prompt_len: int, **first_call) -> torch.Tensor:
    """The segment recurrence by hand, on the tokens of ``sequence`` [B, P + N]: the prompt (its first
    ``prompt_len`` tokens) as one segment, then one token per forward call with the memory carried in ``cache=``;
    the logits of each call's last position, [N, B, V] (what ``generate(output_logits=True)`` reports for its N
    steps). ``first_call``: extra arguments of the prompt's call (``attention_mask``, ``mems``)."""
    logits = []
    with torch.no_grad():
        out = model(sequence[:, :prompt_len], **first_call)
        logits.append(out.logits[:, -1])
        for t in range(prompt_len, sequence.shape[1] - 1):
            out = model(sequence[:, t : t + 1], cache=out.cache)
            logits.append(out.logits[:, -1])
    return torch.stack(logits)


def full_pass_logits(model, sequence: torch.Tensor, prompt_len: int, **kwargs) -> torch.Tensor:
    """One forward pass over ``sequence`` [B, P + N] without a memory: the logits [N, B, V] at the positions that
    predict the N tokens after the prompt. Equal to generation with the memory while the memory still holds every
    earlier token (P + N - 2 <= mem_len); past that the memory has forgotten the oldest tokens and they differ."""
    with torch.no_grad():
        return model(sequence[:, :-1], use_cache=False, **kwargs).logits[:, prompt_len - 1 :].transpose(0, 1)


def assert_context_matters(model, ids: torch.Tensor, min_change: float = 0.5) -> None:
    """The weights are ones on which a test of the memory can fail: the logits of the last position of ``ids``
    [B, T] change by more than ``min_change`` in every row when the earlier tokens are removed. (At the default
    init_std 0.02 a tiny model's greedy tokens do not depend on the context at all; tests use init_std ~0.5.)"""
    with torch.no_grad():
        with_context = model(ids, use_cache=False).logits[:, -1].float()
        alone = model(ids[:, -1:], use_cache=False).logits[:, -1].float()
    change = (with_context - alone).abs().amax(-1)  # [B]
    assert (change > min_change).all(), f"the context barely changes the logits: {change.tolist()}"


def hand_memory_logits(model, sequence: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Like :func:`stepwise_logits`, with the memory kept by hand instead of by the model's cache: after each call,
    every layer's input hidden states (``output_hidden_states``) are appended to that layer's memory and the last
    ``mem_len`` kept, and the next call gets them as plain tensors (``mems=``, a list of [B, M, d_model]) with
    ``use_cache=False``: the paper's recurrence, independent of the cache's update, truncation and stored
    projections. Logits [N, B, V]."""
    config, logits = model.config, []
    memory = [torch.zeros(0)] * config.n_layer  # empty
    if config.legacy_zero_mems:  # a 4.x model starts from mem_len zero vectors
        memory = [torch.zeros(sequence.shape[0], config.mem_len, config.d_model)] * config.n_layer
    calls = [(0, prompt_len)] + [(t, t + 1) for t in range(prompt_len, sequence.shape[1] - 1)]
    with torch.no_grad():
        for start, end in calls:
            mems = memory if memory[0].numel() else None
            out = model(sequence[:, start:end], mems=mems, use_cache=False, output_hidden_states=True)
            logits.append(out.logits[:, -1])
            inputs = out.hidden_states[:-1]  # layer i's input [B, T, d]: the embeddings, then layer i-1's output
            memory = [h if not m.numel() else torch.cat([m, h], 1) for m, h in zip(memory, inputs)]
            memory = [m[:, -config.mem_len :] for m in memory]  # [B, min(tokens so far, mem_len), d]
    return torch.stack(logits)
