"""TxlTrainer runs for tests/test_trainer.py, under ``accelerate launch`` (one or two processes) or plain python.

python tests/trainer_worker.py rows OUT ACCUMULATION   # learning rate 0, two epochs: each process writes
                                                       # OUT/rank<p>.json (its batches, losses in order with and
                                                       # without the memory); rank 0 also log_history.json
HF_TXL_KILL_AT=after_step:N python tests/trainer_worker.py train ARGS   # scripts/train_with_trainer.py, SIGKILLed
                                                       # once step N's loss is logged (no such hook in the script)
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

BATCH, TGT_LEN, LAST = 2, 8, 5  # per-process rows, segment length, the epoch's last (shorter) segment


def rows(out: Path, accumulation: int) -> None:
    from accelerate import PartialState
    from accelerate.utils import set_seed
    from transformers import TrainingArguments

    from hf_txl import StreamBatcher, TxlConfig, TxlForCausalLM, TxlStreamDataset, TxlTrainer, build_tokenizer
    from hf_txl.training.data import DEFAULT_CORPUS_PATH

    args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=BATCH, gradient_accumulation_steps=accumulation,
        num_train_epochs=2, learning_rate=0.0, weight_decay=0.0, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=0,
    )  # fmt: skip
    state = PartialState()  # (set up by TrainingArguments: one or two processes)
    streams = BATCH * state.num_processes
    text = Path(DEFAULT_CORPUS_PATH).read_text()[: streams * (3 * TGT_LEN + LAST) + 1]  # 4 segments per stream
    tokenizer = build_tokenizer("char", [text])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    set_seed(0)
    config = TxlConfig(
        vocab_size=len(tokenizer), d_model=32, n_layer=2, n_head=2, d_head=16, d_inner=64, mem_len=16, dropout=0.0,
        dropatt=0.0, init_std=0.3,
    )  # fmt: skip
    model = TxlForCausalLM(config)
    dataset = TxlStreamDataset(ids, batch_size=BATCH, tgt_len=TGT_LEN, num_processes=state.num_processes)
    received = []

    class Recording(TxlTrainer):
        def compute_loss(self, model, inputs, **kwargs):
            received.append({"segment": inputs["segment"].tolist(), "input_ids": inputs["input_ids"].tolist()})
            return super().compute_loss(model, inputs, **kwargs)

    trainer = Recording(model=model, args=args, train_dataset=dataset)
    trainer.train()

    batches = StreamBatcher.from_accelerator(ids, trainer.accelerator, batch_size=BATCH, tgt_len=TGT_LEN)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model).train()
    expected, with_memory, without_memory, mems = [], [], [], None
    with torch.no_grad():
        for _ in range(2):  # two epochs
            for batch in batches:
                mems = None if batches.new_epoch else mems
                expected.append({"segment": [batches.step - 1] * BATCH, "input_ids": batch["input_ids"].tolist()})
                out_ = unwrapped(**batch, mems=mems)
                mems = out_.mems
                with_memory.append(out_.loss.item())
                without_memory.append(unwrapped(**batch).loss.item())
    result = {
        "received": received, "expected": expected, "with_memory": with_memory, "without_memory": without_memory,
        "segments_per_epoch": len(batches),
    }  # fmt: skip
    (out / f"rank{state.process_index}.json").write_text(json.dumps(result))
    if state.is_main_process:
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history))


def train_with_kill(argv: list[str]) -> None:
    import train_with_trainer

    from hf_txl.training.trainer import TxlTrainer

    where, step = os.environ.get("HF_TXL_KILL_AT", "none:0").split(":")
    if where == "after_step":
        log = TxlTrainer.log

        def log_then_kill(self, logs, *args, **kwargs):
            log(self, logs, *args, **kwargs)
            if "loss" in logs and self.state.global_step == int(step):
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        TxlTrainer.log = log_then_kill
    try:
        train_with_trainer.main(argv)
    except train_with_trainer.UsageError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "rows":
        rows(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        train_with_kill(sys.argv[2:])
