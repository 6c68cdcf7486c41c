"""TxlTrainer and TxlStreamDataset: transformers' Trainer with the memory carried.

The in-process tests use one process; the slow ones run tests/trainer_worker.py and scripts/train_with_trainer.py
with one and two gloo processes (accelerate launch). The weights are drawn at init_std 0.3, where the memory changes
the losses by far more than the tolerances (checked in each test against the same losses without memory).
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from conftest import OTHER_ROUTE, tiny_config, worker_port
from safetensors.torch import load_file
from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler
from transformers import Trainer, TrainingArguments, default_data_collator

from hf_txl import StreamBatcher, TxlForCausalLM, TxlStreamDataset, TxlTrainer
from hf_txl.training.evaluation import evaluate_stream

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "trainer_worker.py"
ENV = {
    **os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    "ACCELERATE_USE_CPU": "true",
}  # fmt: skip
_PORTS = iter(range(worker_port(29610), worker_port(29700)))


def two_processes() -> list[str]:
    """``accelerate launch`` of two gloo processes on the CPU (a fresh port for each launch)."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--dynamo_backend", "no", "--main_process_port", str(next(_PORTS)),
    ]  # fmt: skip


BATCH, TGT_LEN = 2, 8


def stream(length: int = 2 * (3 * TGT_LEN + 5) + 1, seed: int = 0) -> torch.Tensor:
    """A token stream with structure (a repeated random phrase with noise), so a model can learn it."""
    generator = torch.Generator().manual_seed(seed)
    phrase = torch.randint(1, 40, (11,), generator=generator)
    tokens = phrase.repeat(length // 11 + 1)[:length]
    noise = torch.rand(length, generator=generator) < 0.2
    return torch.where(noise, torch.randint(1, 40, (length,), generator=generator), tokens)


def make_model(**overrides) -> TxlForCausalLM:
    torch.manual_seed(0)
    return TxlForCausalLM(tiny_config(mem_len=16, init_std=0.3, **overrides))


def arguments(tmp_path, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH, num_train_epochs=1, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, learning_rate=1e-2,
    )  # fmt: skip
    values.update(overrides)
    return TrainingArguments(**values)


def logged_losses(history) -> list[float]:
    return [record["loss"] for record in history if "loss" in record]


def memory_by_hand(model, dataset: TxlStreamDataset, *, carry: bool = True) -> list[float]:
    """Each segment's mean loss, the streams in order (StreamBatcher), with the memory carried or not."""
    batches, losses, mems = StreamBatcher(dataset.token_ids, batch_size=BATCH, tgt_len=TGT_LEN), [], None
    with torch.no_grad():
        for batch in batches:
            out = model(**batch, mems=mems if carry and not batches.new_epoch else None)
            mems, losses = out.mems, losses + [out.loss.item()]
    return losses


# --- the dataset's order ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_processes", [1, 2, 3])
def test_dealt_items_are_each_process_stream_batches(num_processes):
    """A sequential sampler in batches, dealt by Accelerate's own BatchSamplerShard, gives process p at step t
    exactly StreamBatcher's batch t of process p, the shorter last segment included."""
    tokens = stream(BATCH * num_processes * (3 * TGT_LEN + 5) + 1)
    dataset = TxlStreamDataset(tokens, batch_size=BATCH, tgt_len=TGT_LEN, num_processes=num_processes)
    assert dataset.num_segments == 4 and len(dataset) == 4 * BATCH * num_processes
    for process in range(num_processes):
        sampler = BatchSamplerShard(
            BatchSampler(SequentialSampler(dataset), BATCH, drop_last=False), num_processes, process
        )
        batcher = StreamBatcher(
            tokens, batch_size=BATCH, tgt_len=TGT_LEN, num_processes=num_processes, process_index=process
        )
        dealt = [default_data_collator([dataset[i] for i in indices]) for indices in sampler]
        assert len(dealt) == len(batcher)
        for step, batch in enumerate(dealt):
            expected = batcher.batch_at(step)
            assert torch.equal(batch["input_ids"], expected["input_ids"])
            assert torch.equal(batch["shift_labels"], expected["shift_labels"])
            assert batch["segment"].tolist() == [step] * BATCH
            assert batch["stream"].tolist() == dataset.expected_streams(process)
        assert dealt[-1]["input_ids"].shape[1] == 5  # the epoch's last segment is shorter


# --- settings that would break the order --------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, dataset_sizes, named",
    [
        ({"per_device_train_batch_size": 3}, {}, "per_device_train_batch_size"),
        ({}, {"num_processes": 2}, "num_processes=2"),
        ({"train_sampling_strategy": "group_by_length"}, {}, "train_sampling_strategy"),
        ({"auto_find_batch_size": True}, {}, "auto_find_batch_size"),
        ({"ignore_data_skip": True}, {}, "ignore_data_skip"),
        ({"accelerator_config": {"split_batches": True}}, {}, "split_batches"),
    ],
)
def test_order_breaking_settings_are_refused(tmp_path, overrides, dataset_sizes, named):
    sizes = {"batch_size": BATCH, "tgt_len": TGT_LEN, **dataset_sizes}
    dataset = TxlStreamDataset(stream(200), **sizes)
    with pytest.raises(ValueError, match=named):
        TxlTrainer(model=make_model(), args=arguments(tmp_path, **overrides), train_dataset=dataset)


def test_other_datasets_are_refused(tmp_path):
    dataset = TxlStreamDataset(stream(), batch_size=BATCH, tgt_len=TGT_LEN)
    with pytest.raises(ValueError, match="train_dataset must be a TxlStreamDataset"):
        TxlTrainer(model=make_model(), args=arguments(tmp_path), train_dataset=[dataset[0]])
    with pytest.raises(ValueError, match="eval_dataset must be a TxlStreamDataset"):
        TxlTrainer(model=make_model(), args=arguments(tmp_path), train_dataset=dataset, eval_dataset=[dataset[0]])


def test_rows_dealt_out_of_order_stop_the_run(tmp_path):
    class Shuffling(TxlTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return RandomSampler(self.train_dataset, generator=torch.Generator().manual_seed(0))

    dataset = TxlStreamDataset(stream(2 * 3 * TGT_LEN + 1), batch_size=BATCH, tgt_len=TGT_LEN)  # equal segments
    trainer = Shuffling(model=make_model(), args=arguments(tmp_path), train_dataset=dataset)
    with pytest.raises(RuntimeError, match=r"received streams \[\d+, \d+\] at segments"):
        trainer.train()


# --- the memory in training, evaluation and checkpoints ---------------------------------------------------------


def test_losses_are_the_streams_with_memory_and_a_plain_trainer_differs(tmp_path):
    """Learning rate 0: every logged loss is the model over the streams in order with its memory (two epochs, the
    memory reset at the second's start); a plain Trainer on the same items (sequential, no memory) logs the losses
    without memory: the negative control."""
    dataset = TxlStreamDataset(stream(), batch_size=BATCH, tgt_len=TGT_LEN)
    model = make_model()
    with_memory, without = memory_by_hand(model, dataset), memory_by_hand(model, dataset, carry=False)
    assert min(abs(a - b) for a, b in zip(with_memory[1:], without[1:])) > 0.05  # the memory matters here

    frozen = dict(learning_rate=0.0, weight_decay=0.0, num_train_epochs=2)
    trainer = TxlTrainer(model=model, args=arguments(tmp_path, **frozen), train_dataset=dataset)
    trainer.train()
    assert logged_losses(trainer.state.log_history) == pytest.approx(with_memory * 2, rel=1e-6, abs=0)

    def plain_collator(items):
        return default_data_collator(
            [{k: v for k, v in item.items() if k not in ("segment", "stream")} for item in items]
        )

    plain = Trainer(
        model=model, args=arguments(tmp_path / "plain", train_sampling_strategy="sequential", **frozen),
        train_dataset=dataset, data_collator=plain_collator,
    )  # fmt: skip
    plain.args.remove_unused_columns = False
    plain.train()
    assert logged_losses(plain.state.log_history) == pytest.approx(without * 2, rel=1e-6, abs=0)


def test_evaluate_uses_its_own_memory_and_leaves_the_training_memory(tmp_path):
    train = TxlStreamDataset(stream(), batch_size=BATCH, tgt_len=TGT_LEN)
    valid = TxlStreamDataset(stream(301, seed=1), batch_size=3, tgt_len=5)
    trainer = TxlTrainer(
        model=make_model(), args=arguments(tmp_path, max_steps=3), train_dataset=train, eval_dataset=valid
    )
    trainer.train()
    memory = [layer.clone() for layer in trainer._memory]
    first, second = trainer.evaluate(), trainer.evaluate()
    assert all(torch.equal(a, b) for a, b in zip(memory, trainer._memory)) and trainer._next_segment == 3
    for key in ("eval_loss", "eval_bpc", "eval_perplexity", "eval_tokens"):
        assert first[key] == second[key], key
    direct = evaluate_stream(trainer.model, valid.token_ids, batch_size=3, tgt_len=5)
    assert first["eval_loss"] == pytest.approx(direct["loss"], rel=1e-9)
    assert first["eval_tokens"] == (301 - 1) // 3 * 3  # the whole split: every row's inputs, each scored once
    model = trainer.model.eval()
    with torch.no_grad():  # the same split without memory scores otherwise
        rows = torch.as_tensor(valid.token_ids[:300].astype("int64")).view(3, 100)
        alone = [model(rows[:, t : t + 5], shift_labels=rows[:, t + 1 : t + 6]).loss for t in range(0, 95, 5)]
    assert abs(torch.stack(alone).mean().item() - first["eval_loss"]) > 0.02


def test_use_cache_survives_the_trainer_and_the_saved_config(tmp_path):
    model = make_model()
    assert model.config.use_cache
    dataset = TxlStreamDataset(stream(), batch_size=BATCH, tgt_len=TGT_LEN)
    trainer = TxlTrainer(model=model, args=arguments(tmp_path, max_steps=1), train_dataset=dataset)
    assert trainer.args.use_cache is False and model.config.use_cache is True
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["use_cache"] is True


def test_resume_refuses_other_streams_before_anything_changes(tmp_path):
    dataset = TxlStreamDataset(stream(), batch_size=BATCH, tgt_len=TGT_LEN)
    args = arguments(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    TxlTrainer(model=make_model(), args=args, train_dataset=dataset).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert {p.name for p in checkpoint.glob("txl_*")} == {"txl_state.json", "txl_memory_0.safetensors",
                                                           "txl_position_0.json"}  # fmt: skip
    before = tree_digest(tmp_path / "out")
    other = TxlStreamDataset(stream(), batch_size=BATCH, tgt_len=TGT_LEN - 1)
    trainer = TxlTrainer(model=make_model(), args=arguments(tmp_path, max_steps=4), train_dataset=other)
    with pytest.raises(ValueError, match="tgt_len: checkpoint 8 vs now 7"):
        trainer.train(resume_from_checkpoint=True)
    (checkpoint / "txl_state.json").rename(tmp_path / "moved.json")
    with pytest.raises(ValueError, match="holds no saved memory"):
        TxlTrainer(model=make_model(), args=args, train_dataset=dataset).train(resume_from_checkpoint=str(checkpoint))
    (tmp_path / "moved.json").rename(checkpoint / "txl_state.json")
    assert tree_digest(tmp_path / "out") == before


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def test_lora_trains_adapters_with_the_memory_and_merges(tmp_path):
    """LoRA (PEFT) on the attention projections: only adapter weights change, the losses are the adapted model's
    over the streams with its memory (learning rate 0: the base model's), and merge_and_unload() gives a model
    whose outputs equal the adapted one's."""
    peft = pytest.importorskip("peft")
    dataset = TxlStreamDataset(stream(), batch_size=BATCH, tgt_len=TGT_LEN)
    base = make_model()
    with_memory = memory_by_hand(base, dataset)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj"]))
    frozen = TxlTrainer(model=lora, args=arguments(tmp_path, learning_rate=0.0), train_dataset=dataset)
    frozen.train()
    assert logged_losses(frozen.state.log_history) == pytest.approx(with_memory, rel=1e-6, abs=0)

    before = {name: p.detach().clone() for name, p in lora.named_parameters()}
    TxlTrainer(model=lora, args=arguments(tmp_path, num_train_epochs=3), train_dataset=dataset).train()
    changed = {name for name, p in lora.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed), changed
    lora.eval()
    ids = torch.as_tensor(dataset.token_ids[:40].astype("int64")).view(2, 20)
    with torch.no_grad():
        adapted = lora(input_ids=ids[:, :10]), None
        adapted = (adapted[0].logits, lora(input_ids=ids[:, 10:], mems=adapted[0].mems).logits)
        merged_model = lora.merge_and_unload()
        first = merged_model(input_ids=ids[:, :10])
        merged = (first.logits, merged_model(input_ids=ids[:, 10:], mems=first.mems).logits)
    for a, b in zip(adapted, merged):  # W x + B A x against (W + B A) x: float32 rounding (1.0e-5 seen on AVX2)
        torch.testing.assert_close(a, b, **OTHER_ROUTE)
    assert (adapted[1] - base.__class__(base.config).eval()(input_ids=ids[:, 10:]).logits).abs().max() > 0.1


# --- one and two processes, against hf_txl.train ------------------------------------------------------------


def run(command, *, check=True):
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{command[-4:]} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


@pytest.mark.slow
@pytest.mark.parametrize("processes, accumulation", [(2, 2)])  # one process: in-process tests above
def test_rows_and_losses_follow_each_process_streams(tmp_path, processes, accumulation):
    """Under a real launch: every micro-batch of every process (two epochs, the shorter last segment included)
    is StreamBatcher.from_accelerator's, and with learning rate 0 each logged loss is the mean over processes and
    micro-batches of the model run over the streams in order with its memory; without memory it differs."""
    launcher = two_processes() if processes == 2 else [sys.executable]
    run(launcher + [str(WORKER), "rows", str(tmp_path), str(accumulation)])
    ranks = [json.loads((tmp_path / f"rank{p}.json").read_text()) for p in range(processes)]
    for rank in ranks:
        assert rank["received"] == rank["expected"]
        assert len(rank["received"]) == 2 * rank["segments_per_epoch"] == 8

    def per_step(key):
        micro = [sum(rank[key][i] for rank in ranks) / processes for i in range(8)]
        return [sum(micro[i : i + accumulation]) / accumulation for i in range(0, 8, accumulation)]

    logged = logged_losses(json.loads((tmp_path / "log_history.json").read_text()))
    assert logged == pytest.approx(per_step("with_memory"), rel=1e-6, abs=0)
    carried = [j for j in range(len(logged)) if any((j * accumulation + k) % 4 for k in range(accumulation))]
    differences = [abs(logged[j] - per_step("without_memory")[j]) for j in carried]  # steps past a first segment
    assert carried and min(differences) > 0.01


TINY = ["--preset", "tiny", "--logging_steps", "1", "--max_train_steps", "6", "--config_overrides", "init_std=0.3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """5 segments per epoch for 1 process (4 rows of 32), fewer for 2: six steps cross an epoch boundary."""
    from hf_txl.training.data import DEFAULT_CORPUS_PATH

    text = Path(DEFAULT_CORPUS_PATH).read_text()
    root = tmp_path_factory.mktemp("corpus")
    (root / "train.txt").write_text(text[: 4 * 32 * 5 + 3])
    (root / "valid.txt").write_text(text[700:1700])
    return ["--train_file", str(root / "train.txt"), "--validation_file", str(root / "valid.txt")]


def train_both(tmp_path, corpus, processes, *extra):
    launcher = two_processes() if processes == 2 else [sys.executable]
    ours, theirs = tmp_path / "hf_txl_train", tmp_path / "txl_trainer"
    run(launcher + [str(ROOT / "scripts" / "train.py"), *TINY, *corpus, *extra, "--output_dir", str(ours)])
    run(
        launcher
        + [str(ROOT / "scripts" / "train_with_trainer.py"), *TINY, *corpus, *extra, "--output_dir", str(theirs)]
    )
    return ours, theirs


def script_losses(directory: Path) -> list[float]:
    records = [json.loads(line) for line in (directory / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("processes, accumulation", [(1, 2), (2, 1), (2, 2)])
def test_same_training_as_hf_txl_train(tmp_path, corpus, processes, accumulation):
    """The same flags through scripts/train.py and scripts/train_with_trainer.py: the same per-step losses (the
    Trainer sums each micro-batch's loss / window where train.py averages them: a last-bit difference at most) and
    bit-identical final weights, across an epoch boundary (and its shorter accumulation window)."""
    ours, theirs = train_both(tmp_path, corpus, processes, "--gradient_accumulation_steps", str(accumulation))
    trainer = logged_losses(json.loads((theirs / "log_history.json").read_text()))
    assert len(trainer) == 6 and trainer == pytest.approx(script_losses(ours), rel=1e-6, abs=0)
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    """scripts/train_with_trainer.py, one process, six steps with a checkpoint every two (the reference of the
    kill and evaluation tests; checkpoints change nothing of the arithmetic)."""
    whole = tmp_path_factory.mktemp("trainer") / "whole"
    run([sys.executable, str(ROOT / "scripts" / "train_with_trainer.py"), *TINY, *corpus, "--checkpointing_steps",
         "2", "--output_dir", str(whole)])  # fmt: skip
    return whole


@pytest.mark.slow
def test_killed_run_resumes_exactly_and_refuses_another_process_count(tmp_path, corpus, uninterrupted):
    """SIGKILL after step 5 (mid-epoch; checkpoints every 2 steps), then resume_from_checkpoint=latest: steps 5-6
    and the final weights equal the uninterrupted run. A resume with two processes is refused first, naming the
    process count, and changes no file."""
    common = [*TINY, *corpus, "--checkpointing_steps", "2"]
    whole, killed = uninterrupted, tmp_path / "killed"
    worker = [str(WORKER), "train", *common, "--output_dir", str(killed)]
    result = subprocess.run(
        [sys.executable, *worker], capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**ENV, "HF_TXL_KILL_AT": "after_step:5"},
    )  # fmt: skip
    assert result.returncode == -9, result.stderr[-2000:]
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    before = tree_digest(killed)
    refused = run(two_processes() + [*worker, "--resume_from_checkpoint", "latest"], check=False)
    assert refused.returncode != 0 and "world_size: checkpoint 1 vs now 2" in refused.stderr
    assert "Resume with 1 process(es)" in refused.stderr
    assert tree_digest(killed) == before
    run([sys.executable, *worker, "--resume_from_checkpoint", "latest"])
    resumed = {r["step"]: r["loss"] for r in json.loads((killed / "log_history.json").read_text()) if "loss" in r}
    reference = {r["step"]: r["loss"] for r in json.loads((whole / "log_history.json").read_text()) if "loss" in r}
    assert sorted(resumed) == sorted(reference) == list(range(1, 7))  # 1-4 from the checkpoint's trainer state
    assert all(resumed[s] == reference[s] for s in resumed)
    a, b = load_file(whole / "model.safetensors"), load_file(killed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_evaluation_during_training_and_torch_compile(tmp_path, corpus, uninterrupted):
    """An evaluation every 2 steps changes nothing of the training (the same losses and weights, bit for bit);
    --torch_compile (the Trainer compiles the model) gives the same losses up to float32 rounding."""
    script = [sys.executable, str(ROOT / "scripts" / "train_with_trainer.py"), *TINY, *corpus]
    plain, evaluated, compiled = uninterrupted, tmp_path / "evaluated", tmp_path / "compiled"
    run(script + ["--eval_steps", "2", "--output_dir", str(evaluated)])
    run(script + ["--torch_compile", "--output_dir", str(compiled)])
    reference = logged_losses(json.loads((plain / "log_history.json").read_text()))
    history = json.loads((evaluated / "log_history.json").read_text())
    assert [r["step"] for r in history if "eval_loss" in r] == [2, 4, 6, 6]  # during training, then the final one
    assert logged_losses(history) == reference
    a, b = load_file(plain / "model.safetensors"), load_file(evaluated / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    compiled_losses = logged_losses(json.loads((compiled / "log_history.json").read_text()))
    assert compiled_losses == pytest.approx(reference, rel=1e-4, abs=0)


@pytest.mark.slow
def test_sigterm_checkpoints_and_the_trainer_resumes_exactly(tmp_path, corpus):
    """SIGTERM during TxlTrainer.train(): the step ends, a checkpoint with the memory is saved (no save_strategy
    given), exit status 75; resume_from_checkpoint=latest then logs what an uninterrupted run logs."""
    script = [sys.executable, str(ROOT / "scripts" / "train_with_trainer.py"), *TINY[:-4], *corpus]
    constant = ["--lr_scheduler_type", "constant", "--num_warmup_steps", "0", "--config_overrides", "init_std=0.3"]
    out, whole = tmp_path / "run", tmp_path / "whole"
    with (tmp_path / "stderr.txt").open("w") as errors:
        process = subprocess.Popen(
            script + [*constant, "--max_train_steps", "100000", "--output_dir", str(out)], env=ENV, cwd=ROOT,
            text=True, stdout=subprocess.PIPE, stderr=errors,
        )  # fmt: skip
        logged = 0
        while logged < 3:  # Trainer prints each logged step ({'loss': ...}) on stdout
            line = process.stdout.readline()
            assert line, (tmp_path / "stderr.txt").read_text()[-3000:]
            logged += "'loss'" in line
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=120)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == 75, stderr[-3000:]
    (checkpoint,) = out.glob("checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    assert f"stopped by SIGTERM after step {step}" in stderr and (checkpoint / "txl_memory_0.safetensors").is_file()
    more = [*constant, "--max_train_steps", str(step + 3)]
    run(script + [*more, "--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    run(script + [*more, "--output_dir", str(whole)])
    resumed = {r["step"]: r["loss"] for r in json.loads((out / "log_history.json").read_text()) if "loss" in r}
    uninterrupted = {r["step"]: r["loss"] for r in json.loads((whole / "log_history.json").read_text()) if "loss" in r}
    assert [resumed[s] for s in range(step + 1, step + 4)] == [uninterrupted[s] for s in range(step + 1, step + 4)]
