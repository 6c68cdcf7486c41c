"""A run's progress as people and tools see it: the optimizer's parameter groups, the ``log.jsonl`` metrics log and
the progress bar / trackers of ``hf_txl.training.train``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def make_optimizer(model, *, learning_rate: float, weight_decay: float, betas: tuple[float, float], fused: bool = True):
    """AdamW; no weight decay on biases, LayerNorms, embeddings and the position biases u, v.

    ``fused`` runs one kernel per parameter group instead of a Python loop over tensors; it also works on the
    sharded DTensor parameters of FSDP2 (DTensor implements the fused AdamW kernel), CPU included.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.dim() < 2 or "word_emb" in name or "r_w_bias" in name or "r_r_bias" in name
        (no_decay if skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)


class JsonLog:
    """Append-only JSON-lines metrics log (``log.jsonl``); on resume, records after the checkpoint's step are
    dropped so the log reads as one uninterrupted run."""

    def __init__(self, path: Path, enabled: bool, from_step: int = 0):
        self.path, self.enabled = Path(path), enabled
        if enabled and self.path.exists():
            lines = self.path.read_text().splitlines()
            kept = [line for line in lines if line and json.loads(line)["step"] <= from_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


class TrainingProgress:
    """A run's progress as people and tools see it: a progress bar (loss, learning rate, tokens/s), the
    ``log.jsonl`` records (``JsonLog``) and, with ``tracking``, the Accelerate trackers.

    Training records every ``logging_steps`` steps and at the last one: ``loss`` (mean over the step's micro-steps
    and processes), ``lr``, ``tokens_per_s`` (all processes, since the previous record) and ``epoch``. Evaluation
    records carry ``eval_<metric>``, the final one ``final: true``.
    """

    def __init__(self, accelerator, output_dir, *, total_steps, start_step, logging_steps, tokens_per_micro_step,
                 tracking=False):  # fmt: skip
        from tqdm.auto import tqdm

        self.accelerator, self.tracking = accelerator, tracking
        self.total_steps, self.logging_steps, self.tokens_per_micro_step = (
            total_steps,
            logging_steps,
            tokens_per_micro_step,
        )
        self.log = JsonLog(Path(output_dir) / "log.jsonl", accelerator.is_main_process, from_step=start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not accelerator.is_local_main_process)
        self.window_tokens, self.window_start = 0, time.perf_counter()

    def micro_step(self) -> None:
        self.window_tokens += self.tokens_per_micro_step

    def step(self, step: int, *, loss: float, lr: float, epoch: int) -> None:
        tokens_per_s = self.window_tokens / max(time.perf_counter() - self.window_start, 1e-9)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        if step % self.logging_steps == 0 or step == self.total_steps:
            self._record(step, {"loss": loss, "lr": lr, "tokens_per_s": tokens_per_s}, "", epoch=epoch)
            self.window_tokens, self.window_start = 0, time.perf_counter()

    def evaluation(self, step: int, metrics: dict, *, message: str, final: bool = False) -> None:
        self._record(step, metrics, "eval_", **({"final": True} if final else {}))
        if final:
            self.accelerator.print(message)
        elif self.accelerator.is_local_main_process:
            self.bar.write(message)

    def _record(self, step: int, metrics: dict, prefix: str, **extra) -> None:
        self.log.write({"step": step, **extra, **{f"{prefix}{k}": v for k, v in metrics.items()}})
        if self.tracking:
            self.accelerator.log({f"{prefix or 'train_'}{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.bar.close()
