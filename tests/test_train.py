"""scripts/train.py end to end: training, export, exact resume after SIGKILL, damaged checkpoints, two processes,
the CPU thread count under accelerate launch, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import worker_port
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "scripts" / "train.py")]
KILL_TRAIN = [sys.executable, str(ROOT / "tests" / "kill_train.py")]  # hf_txl.train with a SIGKILL at a chosen point
TINY = ["--preset", "tiny", "--logging_steps", "1"]


def run_train(args, *, env=None, check=True, launcher=None, script=TRAIN):
    """Run the training script in a new process with this environment, updated by ``env`` (a None value unsets)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name, value in (env or {}).items():
        if value is None:
            full_env.pop(name, None)
        else:
            full_env[name] = value
    command = (launcher or script[:1]) + script[1:] + list(args)
    result = subprocess.run(command, capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def losses(output_dir):
    """Training loss per step (the last record wins for a step logged twice)."""
    records = [json.loads(line) for line in Path(output_dir, "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow
def test_tiny_run_learns_and_exports_a_loadable_model(tmp_path):
    out = tmp_path / "run"
    run_train([*TINY, "--output_dir", str(out), "--max_train_steps", "40", "--learning_rate", "1e-2"])
    trajectory = losses(out)
    first = sum(trajectory[s] for s in range(1, 6)) / 5
    last = sum(trajectory[s] for s in range(36, 41)) / 5
    assert last < first - 0.5, trajectory
    results = json.loads((out / "eval_results.json").read_text())
    assert results["tokens"] > 100_000 and results["loss"] < first  # the whole validation split, in order

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_txl  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "TxlForCausalLM"
    prompt = tokenizer("ROMEO:", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    text = tokenizer.decode(generated[0])
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 20
    assert {p.name for p in out.iterdir()} >= {
        "model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "configuration_txl.py", "modeling_txl.py", "log.jsonl", "training_args.json",
    }  # fmt: skip


@pytest.mark.slow
def test_sigkill_and_resume_equals_an_uninterrupted_run(tmp_path):
    common = [*TINY, "--max_train_steps", "12", "--checkpointing_steps", "6", "--config_overrides", "dropout=0.1"]
    straight = tmp_path / "straight"
    run_train([*common, "--output_dir", str(straight)])

    killed = tmp_path / "killed"
    kill = {"HF_TXL_KILL_AT": "after_step:9"}
    result = run_train([*common, "--output_dir", str(killed)], env=kill, check=False, script=KILL_TRAIN)
    assert result.returncode == -signal.SIGKILL
    assert not (killed / "model.safetensors").exists()
    assert max(losses(killed)) == 9  # it really ran past the checkpoint at step 6
    run_train([*common, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"])

    assert losses(killed) == losses(straight)
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_kill_while_saving_leaves_previous_checkpoint_loadable(tmp_path):
    out = tmp_path / "run"
    common = [*TINY, "--max_train_steps", "8", "--checkpointing_steps", "4", "--output_dir", str(out)]
    result = run_train(common, env={"HF_TXL_KILL_AT": "during_save:8"}, check=False, script=KILL_TRAIN)
    assert result.returncode == -signal.SIGKILL
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == [".tmp_step_00000008", "step_00000004"]  # the half-written one is not a checkpoint
    resumed = run_train([*common, "--resume_from_checkpoint", "latest"])
    assert "at step 4" in resumed.stdout + resumed.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004", "step_00000008"]


@pytest.mark.slow
def test_two_processes_follow_the_single_process_loss_trajectory(tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    common = [*TINY, "--max_train_steps", "8"]
    run_train([*common, "--per_device_train_batch_size", "4", "--output_dir", str(single)])
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += [
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(worker_port(29533)),
    ]
    run_train(
        [*common, "--per_device_train_batch_size", "2", "--output_dir", str(double)],
        env={"ACCELERATE_USE_CPU": "true"},
        launcher=launcher,
    )
    assert json.loads((double / "training_args.json").read_text())["per_device_train_batch_size"] == 2
    one, two = losses(single), losses(double)
    assert one.keys() == two.keys() == set(range(1, 9))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-5), step
    a, b = load_file(single / "model.safetensors"), load_file(double / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_bf16_on_a_cpu_without_native_bf16_warns_and_still_trains(tmp_path):
    from hf_txl.training import cpu_has_native_bf16

    out = tmp_path / "bf16"
    result = run_train(
        [*TINY, "--output_dir", str(out), "--max_train_steps", "2"], env={"ACCELERATE_MIXED_PRECISION": "bf16"}
    )
    warned = "emulated" in result.stdout + result.stderr
    assert warned == (cpu_has_native_bf16() is False)
    assert (out / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("overrides", ["dropout=0.0", "cutoffs=[20,40],div_val=2"], ids=["plain", "adaptive"])
def test_mixed_precision_flag_follows_the_fp32_loss_curve(tmp_path, overrides):
    """--mixed_precision bf16 through the script: a 20-step loss curve within 0.03 nats of fp32 at every step
    (tests/test_mixed_precision.py measures ~0.001 in process), and the run says which precision it used."""
    common = [*TINY, "--max_train_steps", "20", "--learning_rate", "1e-2", "--config_overrides", overrides]
    run_train([*common, "--output_dir", str(tmp_path / "fp32")])
    mixed = run_train([*common, "--output_dir", str(tmp_path / "bf16"), "--mixed_precision", "bf16"])
    assert "mixed precision bf16" in mixed.stdout
    fp32, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert fp32.keys() == bf16.keys() == set(range(1, 21))
    assert max(abs(fp32[s] - bf16[s]) for s in fp32) < 0.03, (fp32, bf16)
    assert fp32 != bf16  # bf16 really ran


# --- bad input: clear errors before any training, nothing overwritten ------------------------------------


def assert_one_line_error(result, message):
    """A user error: non-zero exit, one ``train.py: error: ...`` line naming the problem, no traceback."""
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("train.py: error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


def test_unknown_preset():
    assert_one_line_error(run_train(["--preset", "huge"], check=False), "Unknown preset 'huge'")


BAD_ARGUMENTS = [
    (["--dataset_name", "x", "--train_file", "y"], "alternatives"),
    (["--resume_from_checkpoint", "latest", "--overwrite_output_dir"], "deletes it"),
    (["--push_to_hub"], "needs --hub_model_id"),
    (["--tgt_len", "0"], "--tgt_len must be >= 1"),
    (["--learning_rate", "-0.001"], "--learning_rate must be a positive number, got -0.001"),
    (["--learning_rate", "nan"], "--learning_rate must be a positive number"),
    (["--adam_beta2", "1.0"], "--adam_beta2 must lie in [0, 1)"),
    (["--weight_decay", "-1"], "--weight_decay must be >= 0"),
    (["--num_threads", "0"], "--num_threads must be >= 1"),
    (["--min_frequency", "3"], "apply to --tokenizer word only"),
    (["--tokenizer", "words"], "invalid choice: 'words'"),
    (["--max_train_steps", "ten"], "invalid int value: 'ten'"),
    (["--checkpointing_steps", "often"], "--checkpointing_steps must be"),
    (["--validation_split_fraction", "1.5"], "(0, 1)"),
    (["--config_overrides", "n_layers=3"], "unknown field 'n_layers' in 'n_layers=3'; did you mean 'n_layer'?"),
    (["--config_overrides", "cutoffs=[10,20"], "--config_overrides: "),
    (["--config_overrides", "d_model=-1"], "`d_model`"),
    (["--per_device_train_batch_size", "100000"], "shorter than one batch"),
    (["--train_file", "/nonexistent/corpus.txt"], "corpus.txt"),
    (["--resume_from_checkpoint", "latest"], "no checkpoint under"),
]


@pytest.fixture(scope="module")
def refused_runs(tmp_path_factory):
    """Every BAD_ARGUMENTS case through hf_txl.train's ``main`` (tests/refused_runs.py: one process for all, each
    case with its own output directory): ``{case index: (output_dir, result)}``. test_unknown_preset and
    test_empty_corpus_is_a_clear_error check the same one-line errors from a process of their own."""
    from types import SimpleNamespace

    root = tmp_path_factory.mktemp("refused")
    cases = [[*TINY, "--output_dir", str(root / f"out{i}"), *args] for i, (args, _) in enumerate(BAD_ARGUMENTS)]
    results = run_train([json.dumps(cases)], script=[sys.executable, str(ROOT / "tests" / "refused_runs.py")])
    replies = json.loads(results.stdout.strip().splitlines()[-1])
    return {i: (root / f"out{i}", SimpleNamespace(**reply)) for i, reply in enumerate(replies)}


@pytest.mark.parametrize("case", range(len(BAD_ARGUMENTS)), ids=[" ".join(a)[:40] for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_fail_before_training(refused_runs, case):
    out, result = refused_runs[case]
    assert_one_line_error(result, BAD_ARGUMENTS[case][1])
    assert not (out / "checkpoints").exists()


def test_empty_corpus_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = run_train([*TINY, "--output_dir", str(tmp_path / "out"), "--train_file", str(empty)], check=False)
    assert_one_line_error(result, "the training corpus is empty")


def file_times(root: Path) -> dict:
    """Every file's (mtime, size), the run's lock file excepted (each run, refused or not, takes and gives back the
    lock: it names the holder, it holds no data)."""
    files = (p for p in root.rglob("*") if p.is_file() and p.name != ".hf_txl.lock")
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in files}


DAMAGE_RUN = [*TINY, "--max_train_steps", "12", "--checkpointing_steps", "4", "--checkpoints_total_limit", "3"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """An uninterrupted 12-step run with checkpoints at 4, 8 and 12 (each test damages its own copy)."""
    straight = tmp_path_factory.mktemp("damage") / "straight"
    run_train([*DAMAGE_RUN, "--output_dir", str(straight)])
    return straight


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_damaged_checkpoint_is_found_before_loading(tmp_path, damage, straight_run):
    """A truncated or overwritten file in the newest checkpoint: an explicit path to it is refused naming the file,
    and nothing changes; ``latest`` falls back to the previous checkpoint with a warning and then continues exactly
    like an uninterrupted run."""
    common, straight = DAMAGE_RUN, straight_run
    out = tmp_path / "run"
    shutil.copytree(straight, out)  # the same run, byte for byte
    newest = out / "checkpoints" / "step_00000012"
    weights = newest / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.write_bytes(data[:-8] + bytes(8))  # same size, other bytes
    before = file_times(out)

    explicit = run_train([*common, "--output_dir", str(out), "--resume_from_checkpoint", str(newest)], check=False)
    assert_one_line_error(explicit, "model.safetensors")
    assert "damaged" in explicit.stderr
    assert file_times(out) == before  # exported model and every checkpoint untouched

    resumed = run_train([*common, "--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    log = resumed.stdout + resumed.stderr
    assert "skipping damaged checkpoint" in log and str(weights) in log
    assert "step_00000008 at step 8" in log
    assert losses(out) == losses(straight)
    a, b = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for step in ("00000004", "00000008"):  # the intact checkpoints were read, never rewritten
        kept = {p: t for p, t in before.items() if f"step_{step}" in str(p)}
        assert kept and all(file_times(out).get(p) == t for p, t in kept.items())


def test_every_checkpoint_damaged_is_refused_and_nothing_changes(tmp_path):
    from hf_txl.training.checkpointing import CheckpointError, resolve_checkpoint

    broken = tmp_path / "checkpoints" / "step_00000002"
    broken.mkdir(parents=True)
    (broken / "trainer_state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        resolve_checkpoint(tmp_path, str(broken))
    seen = []
    with pytest.raises(CheckpointError, match="every checkpoint .* is damaged"):
        resolve_checkpoint(tmp_path, "latest", on_damaged=seen.append)
    assert len(seen) == 1 and "step_00000002" in seen[0]
    assert sorted(p.name for p in broken.iterdir()) == ["trainer_state.json"]


def clean_launch_env(tmp_path, **extra):
    """accelerate launch with no config file (a fresh HF_HOME) and no thread setting of ours."""
    unset = {name: None for name in os.environ if name.startswith(("ACCELERATE_", "OMP_"))}
    return {**unset, "HF_HOME": str(tmp_path / "hf_home"), **extra}


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra_env,train_flags,expected",
    [
        ({}, [], "physical cores / 1 local process(es)"),
        ({"OMP_NUM_THREADS": "1"}, [], "1 CPU thread(s) per process (OMP_NUM_THREADS"),
        ({}, ["--num_threads", "1"], "1 CPU thread(s) per process (--num_threads)"),
    ],
)
def test_plain_accelerate_launch_uses_the_cores(tmp_path, extra_env, train_flags, expected):
    """Without --cpu, accelerate launch pins a CPU process to one thread; hf_txl.train replaces that default only."""
    from hf_txl.training import physical_cores

    launcher = [sys.executable, "-m", "accelerate.commands.launch"]  # no flags, no config
    env = clean_launch_env(tmp_path, **extra_env)
    result = run_train([*TINY, "--max_train_steps", "1", "--output_dir", str(tmp_path / "o"), *train_flags],
                       env=env, launcher=launcher)  # fmt: skip
    line = next(line for line in result.stdout.splitlines() if line.startswith("Using "))
    assert expected in line, line
    if not extra_env and not train_flags:
        assert line.startswith(f"Using {physical_cores()} CPU thread(s)"), line


@pytest.mark.slow
def test_existing_run_is_protected_and_config_mismatch_is_refused(tmp_path):
    out = tmp_path / "run"
    run_train([*TINY, "--max_train_steps", "4", "--checkpointing_steps", "2", "--output_dir", str(out)])
    before = file_times(out)

    again = run_train([*TINY, "--max_train_steps", "4", "--output_dir", str(out)], check=False)
    assert again.returncode != 0 and "--resume_from_checkpoint latest" in again.stderr
    mismatch = run_train(
        [*TINY, "--max_train_steps", "6", "--output_dir", str(out), "--resume_from_checkpoint", "latest",
         "--config_overrides", "n_layer=3"],
        check=False,
    )  # fmt: skip
    assert mismatch.returncode != 0 and "different model configuration (n_layer" in mismatch.stderr
    missing = run_train([*TINY, "--output_dir", str(out), "--resume_from_checkpoint", str(tmp_path)], check=False)
    assert missing.returncode != 0 and "not a complete checkpoint" in missing.stderr
    assert file_times(out) == before
