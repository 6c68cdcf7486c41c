"""Mixed precision (``torch.autocast`` / ``accelerate --mixed_precision``): the adaptive softmax and the loss in fp32.

The dtype contract of :class:`TxlForCausalLM` under autocast: the plain head's ``logits`` have the autocast dtype
(bf16 / fp16), the adaptive softmax's log-probabilities are computed in float32 outside autocast, and ``loss`` is
always taken on float32 logits and is float32. The tolerances below are about 10x the differences measured on the
2-core CPU development machine (stated next to each).
"""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from conftest import tiny_config

from hf_txl import TxlForCausalLM
from hf_txl.training.data import StreamBatcher

V = 60
PLAIN = {}
ADAPTIVE = {  # one matrix per cluster (div_val 2), and one sliced matrix with shared tail projections
    "div2": dict(vocab_size=V, cutoffs=[10, 30], div_val=2),
    "div1_proj_shared": dict(vocab_size=V, cutoffs=[10, 30, 45], d_embed=16, proj_share_all_but_first=True),
}
VARIANTS = {"plain": PLAIN, **ADAPTIVE}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def two_segment_forward(model, ids, **labels):
    """The second of two segments (so that the memory takes part): its output."""
    first = model(ids, **labels)
    return model(ids, mems=first.mems, **labels)


# ----------------------------------------------------------------------------------------------------
# One forward under autocast
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bf16_autocast_loss_is_fp32_and_close_to_fp32(variant):
    """Measured |bf16 - fp32| loss: 3e-5 (plain), <= 1.5e-6 (adaptive; 5e-4..3e-3 before the adaptive softmax ran
    in fp32); log-probability max |diff| <= 3e-4 (adaptive; 4e-2 before)."""
    model = TxlForCausalLM(tiny_config(mem_len=8, **VARIANTS[variant])).eval()
    ids = torch.randint(1, model.config.vocab_size, (4, 16))
    with torch.no_grad():
        reference = two_segment_forward(model, ids, labels=ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = two_segment_forward(model, ids, labels=ids)
    assert low.loss.dtype == torch.float32 and torch.isfinite(low.loss)
    if variant == "plain":
        assert low.logits.dtype == torch.bfloat16  # the linear head runs in the autocast dtype
        assert abs(low.loss.item() - reference.loss.item()) < 1e-3
    else:
        assert low.logits.dtype == torch.float32
        assert abs(low.loss.item() - reference.loss.item()) < 2e-4
        torch.testing.assert_close(low.logits, reference.logits, atol=3e-3, rtol=0)
        torch.testing.assert_close(low.logits.exp().sum(-1), torch.ones(4, 16), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", list(ADAPTIVE))
def test_adaptive_softmax_ignores_autocast_and_returns_fp32(variant):
    """The same fp32 hidden states give the same log-probabilities with and without autocast; bf16 ones give the
    fp32 log-probabilities of their values (computed in fp32, not in bf16).

    Measured max |diff| from the log-probabilities of the unrounded fp32 input (5 seeds): <= 1.2e-4, the input's
    rounding alone; with the adaptive softmax computed in bf16 (and returned as fp32) instead: 3.1e-2 to 4.4e-2."""
    model = TxlForCausalLM(tiny_config(**ADAPTIVE[variant])).eval()
    hidden = torch.randn(3, 5, 32)
    with torch.no_grad():
        reference = model.lm_head(hidden, model.transformer.word_emb)
        rounded = model.lm_head(hidden.bfloat16().float(), model.transformer.word_emb)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.lm_head(hidden, model.transformer.word_emb)
            from_bf16 = model.lm_head(hidden.bfloat16(), model.transformer.word_emb)
    torch.testing.assert_close(low, reference, atol=0, rtol=0)
    assert from_bf16.dtype == torch.float32
    torch.testing.assert_close(from_bf16, rounded, atol=0, rtol=0)  # the fp32 maths on the rounded input
    torch.testing.assert_close(from_bf16, reference, atol=1e-3, rtol=0)


@pytest.mark.parametrize("targets", ["labels", "shift_labels"])
def test_loss_function_gets_fp32_logits_outside_autocast(targets):
    """The plain head under autocast: whatever ``loss_function`` is set, it sees float32 logits, autocast off."""
    model = TxlForCausalLM(tiny_config())
    seen = []
    default = model.loss_function

    def spy(logits, labels, vocab_size, **kwargs):
        seen.append((logits.dtype, torch.is_autocast_enabled("cpu")))
        return default(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)

    model.loss_function = spy
    ids = torch.randint(1, 40, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, **{targets: ids})
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert seen == [(torch.float32, False)]


@pytest.mark.parametrize("variant", ["plain", "div2"])
def test_bf16_model_gives_fp32_loss_and_finite_gradients(variant):
    """A model whose weights are bf16 (no autocast): the adaptive softmax upcasts its weights, the loss is fp32."""
    model = TxlForCausalLM(tiny_config(mem_len=8, **VARIANTS[variant])).to(torch.bfloat16)
    ids = torch.randint(1, 40, (2, 8))
    out = two_segment_forward(model, ids, labels=ids)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert out.logits.dtype == (torch.bfloat16 if variant == "plain" else torch.float32)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all()
               for p in model.parameters())  # fmt: skip


def scaled_fp16_step(device: str, variant: str) -> tuple[torch.Tensor, float, float]:
    """One fp16-autocast training step with a GradScaler: (loss, scale before, scale after)."""
    model = TxlForCausalLM(tiny_config(mem_len=8, **VARIANTS[variant])).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(device)
    ids = torch.randint(1, 40, (2, 8), device=device)
    with torch.autocast(device, dtype=torch.float16):
        loss = two_segment_forward(model, ids, labels=ids).loss
    scale = scaler.get_scale()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss, scale, scaler.get_scale()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("variant", ["plain", "div2"])
def test_fp16_autocast_with_grad_scaler_finds_no_inf(device, variant):
    """fp16 with loss scaling: the loss is fp32 and finite, and the scaled gradients hold no inf / NaN (the scaler
    would otherwise skip the step and halve its scale)."""
    loss, before, after = scaled_fp16_step(device, variant)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert after == before


# ----------------------------------------------------------------------------------------------------
# The loss curve through Accelerate
# ----------------------------------------------------------------------------------------------------

STEPS = 40
TEXT = Path(__file__).resolve().parents[1] / "hf_txl" / "training" / "corpus" / "tiny_shakespeare.txt"


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps its state process-wide: each Accelerator here starts from (and leaves) a clean one."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def char_stream(n_chars: int = 6000) -> tuple[np.ndarray, int]:
    """The first characters of Tiny Shakespeare as ids ranked by frequency (the adaptive shortlist is the frequent
    ones), and the vocabulary size."""
    text = TEXT.read_text(encoding="utf-8")[:n_chars]
    rank = {char: i for i, (char, _) in enumerate(Counter(text).most_common())}
    return np.array([rank[c] for c in text], dtype=np.int64), len(rank)


def train_curve(mixed_precision: str, overrides: dict, tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """Train a tiny model from seed 0 for STEPS steps like scripts/train.py (memory carried, gradients clipped);
    return every step's loss."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=True)
    set_seed(0)
    config = tiny_config(vocab_size=vocab_size, mem_len=32, **{k: v for k, v in overrides.items() if k != "vocab_size"})
    model = TxlForCausalLM(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    batches = StreamBatcher.from_accelerator(tokens, accelerator, batch_size=4, tgt_len=32)
    losses, mems = [], None
    for batch in batches:  # 47 batches per epoch: one epoch, no memory reset
        out = model(input_ids=batch["input_ids"], shift_labels=batch["shift_labels"], mems=mems)
        mems = out.mems
        accelerator.backward(out.loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if len(losses) == STEPS:
            break
    return np.array(losses)


@pytest.mark.parametrize("variant", ["plain", "div2"])
def test_bf16_loss_curve_follows_fp32(variant):
    """Measured over 40 steps (CPU, torch 2.13): max |bf16 - fp32| 0.0009 (plain) / 0.0014 (adaptive) nats, final
    losses within 0.03%; the loss falls from 4.02 / 3.55 to a last-5 mean of 3.18 / 3.00."""
    tokens, vocab_size = char_stream()
    full = train_curve("no", VARIANTS[variant], tokens, vocab_size)
    low = train_curve("bf16", VARIANTS[variant], tokens, vocab_size)
    assert len(full) == len(low) == STEPS and np.isfinite(low).all()
    assert np.abs(low - full).max() < 0.02
    assert abs(low[-1] - full[-1]) < 0.01 * full[-1]
    for curve in (full, low):  # it learned: the last steps are well below the first
        assert curve[-5:].mean() < curve[0] - 0.25
