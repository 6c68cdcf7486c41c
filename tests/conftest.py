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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
