"""Faults of real machines, provoked for real on scripts/train.py: a full disk (a small tmpfs, or a file-size limit
where mounting is not allowed), SIGTERM to a real ``accelerate launch`` run (one and two gloo processes), a second
run on the same --output_dir, and a non-finite loss. In every case the checkpoints written before the fault load and
resume exactly."""

import contextlib
import hashlib
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import worker_port
from test_train import ROOT, losses

pytestmark = pytest.mark.slow

ENV = {
    **os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    "ACCELERATE_USE_CPU": "true",
}  # fmt: skip
TRAIN = [sys.executable, str(ROOT / "scripts" / "train.py")]
_PORTS = iter(range(worker_port(29710), worker_port(29790)))


def launch(processes: int) -> list[str]:
    """``accelerate launch`` of scripts/train.py on the CPU: one process (Accelerate's simple launcher) or two gloo
    processes (torchrun)."""
    multi = ["--multi_gpu", "--num_processes", "2"] if processes == 2 else ["--num_processes", "1"]
    return [
        sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_machines", "1", "--dynamo_backend", "no",
        "--main_process_port", str(next(_PORTS)), str(ROOT / "scripts" / "train.py"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from hf_txl.training.data import DEFAULT_CORPUS_PATH

    text = Path(DEFAULT_CORPUS_PATH).read_text()
    root = tmp_path_factory.mktemp("corpus")
    (root / "train.txt").write_text(text[:20_000])
    (root / "valid.txt").write_text(text[20_000:21_000])
    return [
        "--preset", "tiny", "--train_file", str(root / "train.txt"), "--validation_file", str(root / "valid.txt"),
        "--logging_steps", "1", "--lr_scheduler_type", "constant", "--num_warmup_steps", "0",
    ]  # fmt: skip


def run(command, *, check=True, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def digest(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "log.jsonl")
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def error_line(stderr: str) -> str:
    """The run's one-line error (train.py: error: ...), with no traceback before it."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = re.findall(r"train\.py: [^\r\n]*", stderr)  # (after a progress bar's line, on the same line)
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def checkpoints(output_dir: Path) -> list[str]:
    return sorted(p.name for p in (output_dir / "checkpoints").iterdir())


# --- a full disk --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of ``size`` at ``path`` (root only); None where mounting is not allowed."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    try:
        yield mounted.returncode == 0
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def limit_file_size(limit: int):
    """A preexec_fn: files larger than ``limit`` bytes cannot be written (EFBIG instead of SIGXFSZ)."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_full_disk_stops_before_the_next_checkpoint_and_the_earlier_ones_resume(tmp_path, corpus):
    """A 1 MiB disk holds two checkpoints (335 KB each) of the tiny model: the third is refused before writing (the
    free space is less than the newest checkpoint), with one line; both earlier checkpoints stay intact, no partial
    checkpoint is left, and --resume_from_checkpoint latest (on a larger disk) recomputes steps 5 and 6 exactly as
    the run had before the disk filled."""
    disk = tmp_path / "disk"
    args = [*corpus, "--max_train_steps", "8", "--checkpointing_steps", "2", "--checkpoints_total_limit", "4"]
    with small_disk(disk, "1m") as mounted:
        if not mounted:
            pytest.skip("mounting a tmpfs needs root (the file-size test below covers write failures)")
        result = run(TRAIN + [*args, "--output_dir", str(disk / "run")], check=False)
        line = error_line(result.stderr)
        assert result.returncode == 1
        assert f"no space left on the device holding {disk / 'run' / 'checkpoints'}" in line
        assert "while writing checkpoint step_00000006" in line and " needed, " in line
        assert "resume with --resume_from_checkpoint latest" in line
        saved = disk / "run"
        assert checkpoints(saved) == ["step_00000002", "step_00000004"]
        before_the_fault = losses(saved)
        assert sorted(before_the_fault) == list(range(1, 7))
        moved = tmp_path / "moved"
        subprocess.run(["cp", "-a", str(saved), str(moved)], check=True)
    from hf_txl.training.checkpointing import find_damage

    assert all(find_damage(moved / "checkpoints" / name) is None for name in checkpoints(moved))
    run(TRAIN + [*args, "--output_dir", str(moved), "--resume_from_checkpoint", "latest"])
    assert [losses(moved)[s] for s in (5, 6)] == [before_the_fault[s] for s in (5, 6)]
    assert sorted(losses(moved)) == list(range(1, 9))


def test_a_failed_checkpoint_write_is_one_line_and_leaves_no_partial_checkpoint(tmp_path, corpus):
    """A write that fails for real while the checkpoint is written (files over 100 KB refused: the optimizer state
    is 175 KB): one line naming what and where, exit 1, no temporary directory left; the run's earlier files (its
    log) are kept."""
    out = tmp_path / "run"
    args = [*corpus, "--max_train_steps", "4", "--checkpointing_steps", "2", "--output_dir", str(out)]
    result = run(TRAIN + args, check=False, preexec_fn=limit_file_size(100_000))
    line = error_line(result.stderr)
    assert result.returncode == 1 and "while writing checkpoint step_00000002" in line, line
    assert list((out / "checkpoints").iterdir()) == []  # the partial checkpoint was removed
    assert sorted(losses(out)) == [1, 2]


def test_a_failed_export_leaves_the_previous_export(tmp_path):
    """The export is written to a staging directory and moved into place: a write error part-way leaves the
    directory's earlier files (an earlier export) exactly as they were, and no staging directory."""
    from hf_txl.training.export import staged

    (tmp_path / "model.safetensors").write_bytes(b"the earlier export")
    before = digest(tmp_path)
    with pytest.raises(OSError), staged(tmp_path) as stage:
        (stage / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")
    assert digest(tmp_path) == before and not (tmp_path / ".tmp_export").exists()
    with staged(tmp_path) as stage:
        (stage / "model.safetensors").write_bytes(b"the new export")
    assert (tmp_path / "model.safetensors").read_bytes() == b"the new export"


# --- preemption ---------------------------------------------------------------------------------------------------


def wait_for_step(output_dir: Path, step: int, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = output_dir / "log.jsonl"
        if log.is_file() and any(s >= step for s in losses(output_dir)):
            return
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached")


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_checkpoints_the_current_step_and_the_run_resumes_exactly(tmp_path, corpus, processes):
    """SIGTERM to a real ``accelerate launch`` (the launcher forwards it to its processes): the current step
    finishes, every process writes its part of one checkpoint, the log says where to resume, within the launcher's
    grace period; --resume_from_checkpoint latest then gives the losses of an uninterrupted run."""
    out = tmp_path / "run"
    common = [*corpus, "--max_train_steps", "100000", "--eval_steps", "0"]
    process = subprocess.Popen(
        launch(processes) + [*common, "--output_dir", str(out)], env=ENV, cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    wait_for_step(out, 3, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM  # the launcher's status; each process exits 75
    stopped = [line for line in stderr.splitlines() if "stopped by SIGTERM after step" in line]
    assert len(stopped) == processes, stderr[-3000:]  # every process says it, none is left waiting
    step = int(stopped[0].split("after step ")[1].split(":")[0])
    assert checkpoints(out) == [f"step_{step:08d}"] and "--resume_from_checkpoint latest" in stopped[0]
    assert max(losses(out)) == step
    more = [*corpus, "--max_train_steps", str(step + 3), "--eval_steps", "0"]
    run(launch(processes) + [*more, "--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    whole = tmp_path / "whole"
    run(launch(processes) + [*more, "--output_dir", str(whole)])
    assert [losses(out)[s] for s in range(step + 1, step + 4)] == [losses(whole)[s] for s in range(step + 1, step + 4)]


def test_sigterm_exit_status_without_a_launcher(tmp_path, corpus):
    """python -m hf_txl.train stopped by SIGUSR1 (SLURM's --signal): exit status 75 and the checkpoint."""
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "hf_txl.train", *corpus, "--max_train_steps", "100000", "--output_dir", str(out)],
        env=ENV, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    wait_for_step(out, 2, process)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-3000:]
    assert "stopped by SIGUSR1" in stderr and len(checkpoints(out)) == 1


# --- one run per directory ----------------------------------------------------------------------------------------


def test_a_second_run_on_a_running_directory_is_refused_and_a_dead_run_lock_is_taken(tmp_path, corpus):
    out = tmp_path / "run"
    args = [*corpus, "--max_train_steps", "100000", "--checkpointing_steps", "2", "--output_dir", str(out)]
    first = subprocess.Popen(TRAIN + args, env=ENV, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_step(out, 3, first)
        second = run(TRAIN + args + ["--overwrite_output_dir"], check=False)  # (a plain second run: the same lock)
        line = error_line(second.stderr)
        assert second.returncode == 2 and f"is in use by another training run (pid {first.pid} on" in line
        assert "--overwrite_output_dir does not take a directory from a running run" in line
        assert checkpoints(out)  # the running run's checkpoints are still there
    finally:
        first.kill()  # SIGKILL: no clean-up; the kernel drops its lock
        first.communicate()
    resumed = run(TRAIN + [*args[:-4], "--max_train_steps", "6", "--output_dir", str(out), "--resume_from_checkpoint",
                           "latest"])  # fmt: skip
    assert "Resumed from" in resumed.stdout + resumed.stderr


# --- a non-finite loss --------------------------------------------------------------------------------------------


def test_non_finite_loss_stops_keeps_the_last_checkpoint_and_a_lower_rate_continues(tmp_path, corpus):
    """Resumed at step 4 with --learning_rate 1e38 (the weights leave the float range), the loss becomes
    non-finite: one line naming the step and the last checkpoint, nothing saved over it; resumed again from it
    with the original rate, the run continues as if the fault had not happened."""
    out, whole = tmp_path / "run", tmp_path / "whole"
    args = [*corpus, "--checkpointing_steps", "2", "--learning_rate", "3e-3"]
    run(TRAIN + [*args, "--max_train_steps", "4", "--output_dir", str(out)])
    before = digest(out / "checkpoints")
    resume = ["--max_train_steps", "8", "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    result = run(TRAIN + [*args, *resume, "--learning_rate", "1e38"], check=False)
    assert "Learning rate 1e+38 instead of the checkpoint's 0.003" in result.stdout + result.stderr  # it takes effect
    line = error_line(result.stderr)
    assert result.returncode == 1 and "the training loss became" in line and "at step 6" in line, line
    assert f"the last checkpoint, {out / 'checkpoints' / 'step_00000004'}, is intact" in line
    assert digest(out / "checkpoints") == before
    run(TRAIN + [*args, *resume])
    run(TRAIN + [*args, "--max_train_steps", "8", "--output_dir", str(whole)])
    assert [losses(out)[s] for s in range(5, 9)] == [losses(whole)[s] for s in range(5, 9)]
