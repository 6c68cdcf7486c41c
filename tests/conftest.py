"""Shared fixtures: tiny configurations that run in milliseconds on a CPU."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hf_txl import TxlConfig  # noqa: E402


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
