"""scripts/train.py on the paths the plain run does not take: gradient accumulation with the memory carried through
the micro-batches (against a loop written here), checkpoints at each epoch end with the memory reset at the epoch
boundary (an exact resume from a checkpoint whose saved memory is noise), and --torch_compile end to end.

Every run trains the tiny preset on a small corpus cut from the bundled one (5 segments per epoch), at init_std 0.3,
where the memory changes the losses by far more than the tolerances below (checked, not assumed).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import TINY, losses, run_train

pytestmark = pytest.mark.slow

BATCH, TGT_LEN, SEGMENTS_PER_EPOCH = 4, 32, 5  # the tiny preset's per-device batch and segment length
LEARNING_RATE = 1e-2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Training and validation files: BATCH rows of exactly SEGMENTS_PER_EPOCH segments (the tokens after the last
    full segment of a row, one per row at most, are dropped), and 1,000 validation characters."""
    from hf_txl.training.data import DEFAULT_CORPUS_PATH

    text = Path(DEFAULT_CORPUS_PATH).read_text()
    train_chars = BATCH * TGT_LEN * SEGMENTS_PER_EPOCH + 3  # (N - 1) // BATCH = 160 inputs per row for N in 643..644
    root = tmp_path_factory.mktemp("corpus")
    (root / "train.txt").write_text(text[:train_chars])
    (root / "valid.txt").write_text(text[train_chars : train_chars + 1000])
    return root / "train.txt", root / "valid.txt"


def common_args(corpus, *extra):
    train, valid = corpus
    return [
        *TINY, "--train_file", str(train), "--validation_file", str(valid), "--learning_rate", str(LEARNING_RATE),
        "--config_overrides", "init_std=0.3", *extra,
    ]  # fmt: skip


def assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- gradient accumulation ------------------------------------------------------------------------------------------

# Windows of 2 micro-batches from each epoch's start, the last ending with the epoch (5 segments: 2 + 2 + 1), as
# transformers' Trainer does: step 3 is the epoch's fifth segment alone, step 4 the second epoch's first two.
ACCUMULATION, ACCUMULATED_STEPS = 2, 4


@pytest.fixture(scope="module")
def accumulated_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("accumulation") / "run"
    args = common_args(
        corpus, "--gradient_accumulation_steps", str(ACCUMULATION), "--max_train_steps", str(ACCUMULATED_STEPS),
        "--num_warmup_steps", "0", "--output_dir", str(out),
    )  # fmt: skip
    run_train(args)
    return out


def hand_loop(run_dir: Path, corpus, *, carry_memory: bool):
    """The training the script should do, written out: the model built from the run's config with the script's seed,
    AdamW (the script's parameter groups), the cosine schedule, clipping at 1.0, and ACCUMULATION micro-batches per
    optimizer step (fewer in the window that ends an epoch), each micro-batch's loss divided by its window's length
    before backward. With ``carry_memory`` each
    micro-batch continues the previous one's rows with its memory (reset at an epoch's first segment only); without,
    every micro-batch starts from an empty memory. Returns (mean loss of each step's micro-batches, final weights)."""
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer, get_scheduler

    from hf_txl import TxlConfig, TxlForCausalLM
    from hf_txl.training.data import StreamBatcher, load_corpus, tokenize_to_array
    from hf_txl.training.progress import make_optimizer

    train, valid = corpus
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    ids = tokenize_to_array(load_corpus(train_file=str(train), validation_file=str(valid))["train"], tokenizer)
    config = TxlConfig.from_pretrained(run_dir)
    set_seed(42)  # the script's --seed, set before the model is built
    model = TxlForCausalLM._from_config(config, attn_implementation="sdpa").train()
    optimizer = make_optimizer(model, learning_rate=LEARNING_RATE, weight_decay=0.0, betas=(0.9, 0.999))
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=ACCUMULATED_STEPS)
    batches = StreamBatcher(ids, batch_size=BATCH, tgt_len=TGT_LEN)
    assert len(batches) == SEGMENTS_PER_EPOCH

    trajectory, micro_losses, mems = {}, [], None
    while len(trajectory) < ACCUMULATED_STEPS:
        for batch in batches:  # one epoch; the next pass over `batches` is the next epoch
            if batches.new_epoch or not carry_memory:
                mems = None
            window = min(ACCUMULATION, SEGMENTS_PER_EPOCH - (batches.step - 1) // ACCUMULATION * ACCUMULATION)
            out = model(**batch, mems=mems)
            mems = out.mems
            (out.loss / window).backward()
            micro_losses.append(out.loss.detach())
            if len(micro_losses) < window:
                continue
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            trajectory[len(trajectory) + 1] = torch.stack(micro_losses).mean().item()
            micro_losses = []
            if len(trajectory) == ACCUMULATED_STEPS:
                break
    return trajectory, model.state_dict()


def test_gradient_accumulation_carries_the_memory_through_the_micro_batches(accumulated_run, corpus):
    """--gradient_accumulation_steps 2: each optimizer step takes two consecutive segments of the same rows, the
    second continuing the first's memory. The script's per-step losses and final weights equal the hand-written loop
    (measured: identical bits); the same loop with the memory reset at every micro-batch is far from both."""
    carried, carried_weights = hand_loop(accumulated_run, corpus, carry_memory=True)
    reset, _ = hand_loop(accumulated_run, corpus, carry_memory=False)
    script = losses(accumulated_run)
    assert script.keys() == carried.keys() == set(range(1, ACCUMULATED_STEPS + 1))
    for step in script:
        assert script[step] == pytest.approx(carried[step], rel=1e-6, abs=0), (step, script, carried)
    assert max(abs(carried[s] - reset[s]) for s in carried) > 1e-2, (carried, reset)  # the memory matters here
    exported = load_file(accumulated_run / "model.safetensors")
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, carried_weights[name], atol=1e-6, rtol=0, msg=name)
    records = [json.loads(line) for line in (accumulated_run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "loss" in r] == [0, 0, 0, 1]  # step 3 ends the first epoch


# --- --checkpointing_steps epoch --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def epoch_runs(corpus, tmp_path_factory):
    """Two epochs with a checkpoint at each epoch end (constant learning rate, so that the first steps of any run
    length agree); then a run resumed from the first epoch's checkpoint, copied with its saved memory replaced by
    noise (its manifest rewritten to match)."""
    from hf_txl.training.checkpointing import write_manifest

    root = tmp_path_factory.mktemp("epochs")
    args = common_args(corpus, "--checkpointing_steps", "epoch", "--num_train_epochs", "2", "--lr_scheduler_type",
                       "constant", "--checkpoints_total_limit", "3")  # fmt: skip
    straight = root / "straight"
    run_train([*args, "--output_dir", str(straight)])

    noisy = root / "noisy_checkpoint"
    shutil.copytree(straight / "checkpoints" / f"step_{SEGMENTS_PER_EPOCH:08d}", noisy)
    saved = load_file(noisy / "mems_0.safetensors")
    generator = torch.Generator().manual_seed(1)
    noise = {name: 3 * torch.randn(t.shape, generator=generator) for name, t in saved.items()}
    save_file(noise, str(noisy / "mems_0.safetensors"), metadata={"seen_tokens": str(SEGMENTS_PER_EPOCH * TGT_LEN)})
    write_manifest(noisy)
    resumed = root / "resumed"
    result = run_train([*args, "--output_dir", str(resumed), "--resume_from_checkpoint", str(noisy)])
    return args, straight, resumed, result.stdout + result.stderr


def test_epoch_checkpoints_are_written_at_each_epoch_end(epoch_runs):
    """Checkpoints step_<steps at the end of epoch k>, the last epoch's too, each holding the memory of the epoch's
    last segment ([batch, mem_len, d_model] per layer) and the position at the epoch's end."""
    _, straight, _, _ = epoch_runs
    names = sorted(p.name for p in (straight / "checkpoints").iterdir())
    assert names == [f"step_{SEGMENTS_PER_EPOCH:08d}", f"step_{2 * SEGMENTS_PER_EPOCH:08d}"]
    assert set(losses(straight)) == set(range(1, 2 * SEGMENTS_PER_EPOCH + 1))  # --num_train_epochs 2
    for epoch, name in enumerate(names):
        path = straight / "checkpoints" / name
        state = json.loads((path / "trainer_state.json").read_text())
        assert state["step"] == (epoch + 1) * SEGMENTS_PER_EPOCH and state["epoch"] == epoch
        stream = json.loads((path / "stream_0.json").read_text())
        assert (stream["epoch"], stream["step"]) == (epoch, SEGMENTS_PER_EPOCH)
        mems = load_file(path / "mems_0.safetensors")
        assert sorted(mems) == ["layer_0", "layer_1"]
        assert all(m.shape == (BATCH, TGT_LEN, 32) and m.abs().sum() > 0 for m in mems.values())


def test_the_memory_is_reset_at_the_epoch_boundary(epoch_runs):
    """Resumed from the first epoch's checkpoint with noise in place of its saved memory, the run continues bit for
    bit like the uninterrupted one: both start the second epoch from an empty memory. (Were the memory carried over
    the boundary, the straight run would continue the first epoch's memory and the resumed one the noise.)"""
    _, straight, resumed, log = epoch_runs
    assert f"at step {SEGMENTS_PER_EPOCH}." in log
    after = {s: loss for s, loss in losses(straight).items() if s > SEGMENTS_PER_EPOCH}
    assert losses(resumed) == after
    assert_same_weights(straight, resumed)
    assert (resumed / "checkpoints" / f"step_{2 * SEGMENTS_PER_EPOCH:08d}").is_dir()


# --- --torch_compile --------------------------------------------------------------------------------------------

#: Compiled (inductor) against eager losses over 2 steps: measured 8e-8 and 1e-7 apart (fused kernels reorder sums).
COMPILE_RTOL = 1e-5
#: Three graphs to compile (training without and with a memory, one evaluation segment): the validation split as
#: one segment of 8 rows x 124 tokens; inductor compiling in this process (a pool of workers costs more on 2 cores).
COMPILE_RUN = [
    "--torch_compile", "--max_train_steps", "2", "--per_device_eval_batch_size", "8", "--eval_tgt_len", "124",
]  # fmt: skip


def test_torch_compile_trains_exports_and_follows_the_eager_losses(epoch_runs, corpus, tmp_path):
    """--torch_compile: inductor compiles the model (its kernels appear in a fresh cache), the two steps' losses are
    the eager run's within COMPILE_RTOL, and the export (no ``_orig_mod.`` prefix) loads with AutoModelForCausalLM
    and scores the validation split as the compiled model did at the end of training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_txl  # noqa: F401
    from hf_txl.training.data import load_corpus, tokenize_to_array
    from hf_txl.training.evaluation import evaluate_stream

    args, eager, _, _ = epoch_runs
    out, kernels = tmp_path / "compiled", tmp_path / "inductor"
    env = {"TORCHINDUCTOR_CACHE_DIR": str(kernels), "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    run_train([*args, *COMPILE_RUN, "--output_dir", str(out)], env=env)
    assert list(kernels.rglob("*.py")), "nothing was compiled"
    compiled, reference = losses(out), losses(eager)
    assert set(compiled) == {1, 2}
    for step in compiled:
        assert compiled[step] == pytest.approx(reference[step], rel=COMPILE_RTOL, abs=0), (compiled, reference)
    assert compiled[2] < compiled[1] - 0.1  # it trains

    assert load_file(out / "model.safetensors").keys() == load_file(eager / "model.safetensors").keys()
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert type(model).__name__ == "TxlForCausalLM"
    train, valid = corpus
    split = load_corpus(train_file=str(train), validation_file=str(valid))["validation"]
    tokens = tokenize_to_array(split, AutoTokenizer.from_pretrained(out))
    metrics = evaluate_stream(model.eval(), tokens, batch_size=8, tgt_len=124, mem_len=TGT_LEN)
    results = json.loads((out / "eval_results.json").read_text())
    assert metrics["tokens"] == results["tokens"] == 8 * 124
    assert metrics["loss"] == pytest.approx(results["loss"], rel=COMPILE_RTOL)
