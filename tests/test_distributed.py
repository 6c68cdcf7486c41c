"""Distributed training on two CPU processes (gloo): FSDP2 against DDP, exact FSDP2 resume, the export of a sharded
run, FSDP2 with the tied adaptive softmax, the refusal to resume with another number of processes, and the Accelerate
config files in ``configs/`` (each launched, so that the YAML is really parsed and used).

Every run is module-scoped and shared by the tests that read it; each launch of two processes takes 10-20 s.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import worker_port
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
FSDP2_FLAGS = [
    "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
    "--fsdp_transformer_layer_cls_to_wrap", "TxlLayer", "--fsdp_state_dict_type", "SHARDED_STATE_DICT",
]  # fmt: skip
#: 2 processes x 2 rows = the global batch of every two-process run; constant lr so that a run cut at step 4 and
#: resumed has the schedule of a straight one; dropout so that the restored RNG states matter; a small validation
#: split, since the final evaluation reads all of it.
TRAIN = [
    "--preset", "tiny", "--logging_steps", "1", "--max_eval_steps", "2", "--validation_split_fraction", "0.02",
    "--per_device_train_batch_size", "2",
    "--lr_scheduler_type", "constant", "--checkpointing_steps", "4", "--config_overrides", "dropout=0.1",
]  # fmt: skip
#: FSDP2 (reduce-scatter of gradient shards) against DDP (all-reduce) after 8 steps: 2.4e-8 measured.
WEIGHT_ATOL = 1e-6

pytestmark = pytest.mark.slow


def launch(launcher_args, output_dir, *train_args, port: int, check: bool = True):
    """``accelerate launch [launcher_args] scripts/train.py`` on the CPU (gloo); returns stdout + stderr, or with
    ``check=False`` the finished process (``returncode``, ``stdout``, ``stderr``) whatever its exit status."""
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "ACCELERATE_USE_CPU": "true",
    }  # fmt: skip
    command = [
        *LAUNCH, *launcher_args, "--num_machines", "1", "--dynamo_backend", "no",
        "--main_process_port", str(worker_port(port)),
        str(ROOT / "scripts" / "train.py"), *TRAIN, "--output_dir", str(output_dir), *train_args,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if not check:
        return result
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise AssertionError(f"accelerate launch failed ({result.returncode}):\n{output[-6000:]}")
    return output


def config_file(name: str) -> list[str]:
    return ["--config_file", str(CONFIGS / name)]


def losses(output_dir: Path) -> dict[int, float]:
    """Training loss per step from log.jsonl."""
    records = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model.safetensors")


def checkpoint(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step_{step:08d}"


# --- the runs ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """DDP on 2 CPU processes from configs/multi_gpu.yaml (the process count overridden), 8 steps."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    log = launch([*config_file("multi_gpu.yaml"), "--num_processes", "2"], out, "--max_train_steps", "8", port=29561)
    return out, log


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """FSDP2 on 2 CPU processes from configs/fsdp2.yaml, 8 steps, checkpoints at 4 and 8."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    log = launch([*config_file("fsdp2.yaml"), "--num_processes", "2"], out, "--max_train_steps", "8", port=29562)
    return out, log


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """FSDP2 from command-line flags: 4 steps (checkpoint at 4), then resumed from it to 8."""
    out = tmp_path_factory.mktemp("resumed") / "run"
    first = launch([*FSDP2_FLAGS, "--num_processes", "2"], out, "--max_train_steps", "4", port=29563)
    resumed = launch(
        [*FSDP2_FLAGS, "--num_processes", "2"], out, "--max_train_steps", "8", "--resume_from_checkpoint", "latest",
        port=29564,
    )  # fmt: skip
    return out, first, resumed


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """One process from configs/single_machine.yaml, 2 steps."""
    out = tmp_path_factory.mktemp("single") / "run"
    return out, launch(config_file("single_machine.yaml"), out, "--max_train_steps", "2", port=29565)


# --- FSDP2 ---------------------------------------------------------------------------------------------------------


def test_fsdp2_config_file_shards_the_model_and_checkpoints_per_process(fsdp_run):
    from hf_txl.training.checkpointing import find_damage

    out, log = fsdp_run
    assert "on 2 process(es) (FSDP2)" in log
    path = checkpoint(out, 4)
    names = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    for shards in ("pytorch_model_fsdp_0", "optimizer_0"):  # SHARDED_STATE_DICT: one file per process (DCP)
        assert {f"{shards}/.metadata", f"{shards}/__0_0.distcp", f"{shards}/__1_0.distcp"} <= names
    assert "model.safetensors" not in names and "optimizer.bin" not in names
    per_process = {"mems_0.safetensors", "mems_1.safetensors", "stream_0.json", "stream_1.json"}
    assert per_process | {"random_states_0.pkl", "random_states_1.pkl", "trainer_state.json"} <= names
    manifest = json.loads((path / "manifest.json").read_text())["files"]
    assert set(manifest) == names - {"manifest.json"}  # the shards of every process included
    assert find_damage(path) is None
    streams = [json.loads((path / f"stream_{rank}.json").read_text()) for rank in (0, 1)]
    assert all(s["step"] == 4 and s["num_processes"] == 2 for s in streams)
    mems = [load_file(path / f"mems_{rank}.safetensors") for rank in (0, 1)]  # each process's own rows
    assert mems[0].keys() == mems[1].keys() and not torch.equal(mems[0]["layer_0"], mems[1]["layer_0"])


def test_fsdp2_trains_like_ddp_at_the_same_global_batch(fsdp_run, ddp_run):
    (fsdp, _), (ddp, ddp_log) = fsdp_run, ddp_run
    assert "on 2 process(es) (MULTI_CPU)" in ddp_log
    assert losses(fsdp).keys() == losses(ddp).keys() == set(range(1, 9))
    for step, loss in losses(ddp).items():
        assert losses(fsdp)[step] == pytest.approx(loss, rel=1e-6), step
    sharded, replicated = weights(fsdp), weights(ddp)
    assert sharded.keys() == replicated.keys()
    for name in replicated:
        torch.testing.assert_close(sharded[name], replicated[name], atol=WEIGHT_ATOL, rtol=0, msg=name)


def test_fsdp2_resume_from_a_sharded_checkpoint_is_exact(resumed_run, fsdp_run):
    (resumed, first_log, resumed_log), (straight, _) = resumed_run, fsdp_run
    assert "(FSDP2)" in first_log and "Resumed from" in resumed_log and "at step 4." in resumed_log
    assert (checkpoint(resumed, 4) / "pytorch_model_fsdp_0").is_dir()
    assert losses(resumed) == losses(straight)
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_fsdp2_export_loads_with_full_tied_weights(fsdp_run, ddp_run):
    from transformers import AutoModelForCausalLM

    import hf_txl  # noqa: F401

    (fsdp, _), (ddp, _) = fsdp_run, ddp_run
    files = {p.name for p in fsdp.iterdir()}
    assert {"modeling_txl.py", "configuration_txl.py", "cache_txl.py"} <= files
    assert not [name for name in files if name.startswith("_fsdp")]  # not torch's FSDP class's source
    auto_map = json.loads((fsdp / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_txl.TxlForCausalLM"
    assert "lm_head.weight" not in weights(fsdp)  # stored once, as in the unsharded export

    model, info = AutoModelForCausalLM.from_pretrained(fsdp, output_loading_info=True)
    assert not any(info.values()), info
    assert type(model).__name__ == "TxlForCausalLM"
    assert model.lm_head.weight is model.transformer.word_emb.weight
    reference = AutoModelForCausalLM.from_pretrained(ddp)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, reference.eval()(ids).logits, atol=1e-5, rtol=0)


# --- the config files ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["single_machine.yaml", "multi_gpu.yaml", "fsdp2.yaml"])
def test_config_files_say_how_to_use_them(name):
    text = (CONFIGS / name).read_text()
    assert text.startswith("#") and f"accelerate launch --config_file configs/{name} scripts/train.py" in text
    assert "What to change" in text


def test_multi_gpu_config_file_runs_ddp(ddp_run):
    out, log = ddp_run
    assert "on 2 process(es) (MULTI_CPU)" in log
    names = {p.name for p in checkpoint(out, 4).iterdir()}
    assert {"model.safetensors", "optimizer.bin", "mems_0.safetensors", "mems_1.safetensors"} <= names
    assert "pytorch_model_fsdp_0" not in names


def test_single_machine_config_file_runs_one_process(single_run):
    out, log = single_run
    assert "on 1 process(es) (NO)" in log
    assert (out / "model.safetensors").is_file() and set(losses(out)) == {1, 2}


# --- FSDP2 with the adaptive input and softmax -----------------------------------------------------------------

#: Three clusters (the 20 most frequent characters, the next 20, the rest) embedded in 32, 16 and 8 dimensions; the
#: softmax reads the cluster weights of the input embedding (tie_word_embeddings, the default) and the tails' input
#: projections (proj_share_all_but_first). Dropout off, so that one process can follow the two. The later
#: --config_overrides replaces TRAIN's.
ADAPTIVE = ["--config_overrides", "cutoffs=[20,40],div_val=2,proj_share_all_but_first=True", "--max_train_steps", "4"]
#: FSDP2 on 2 x 2 rows against 1 process on 4 rows, after 4 steps: measured 1.2e-6 (lm_head.out_projs.0, elsewhere
#: <= 1.5e-7; one AdamW step moves a weight by about the learning rate, 3e-3) and 1e-7 (losses, relative).
ADAPTIVE_ATOL = 1e-5


@pytest.fixture(scope="module")
def adaptive_runs(tmp_path_factory):
    """The adaptive model trained 4 steps by FSDP2 on 2 processes and by 1 process (python scripts/train.py) at the
    same global batch, each with a checkpoint at step 4."""
    from test_train import run_train

    root = tmp_path_factory.mktemp("adaptive")
    launch([*FSDP2_FLAGS, "--num_processes", "2"], root / "fsdp", *ADAPTIVE, port=29566)
    run_train([*TRAIN, "--output_dir", str(root / "single"), *ADAPTIVE, "--per_device_train_batch_size", "4"])
    return root / "fsdp", root / "single"


def test_fsdp2_trains_the_tied_adaptive_softmax_like_one_process(adaptive_runs):
    """The gradients that reach the shared cluster weights and projections from both the embedding and the softmax
    are gathered and summed across the shards: losses and every weight follow the one-process run."""
    sharded, single = adaptive_runs
    assert losses(sharded).keys() == losses(single).keys() == set(range(1, 5))
    for step, loss in losses(single).items():
        assert losses(sharded)[step] == pytest.approx(loss, rel=1e-6), step
    a, b = weights(sharded), weights(single)
    assert a.keys() == b.keys()
    for name in b:
        torch.testing.assert_close(a[name], b[name], atol=ADAPTIVE_ATOL, rtol=0, msg=name)
    assert not torch.equal(a["lm_head.cluster_weight"], torch.zeros_like(a["lm_head.cluster_weight"]))  # trained


def test_fsdp2_adaptive_export_keeps_the_clusters_tied(adaptive_runs):
    """The export from the shards stores each tied weight once (the input embedding's clusters and projections; the
    softmax keeps only its biases, the cluster logits and the head's own projection), and loads with nothing
    missing or left over into a model whose log-probabilities match the one-process export."""
    from transformers import AutoModelForCausalLM

    import hf_txl  # noqa: F401

    sharded, single = adaptive_runs
    head = sorted(name for name in weights(sharded) if name.startswith("lm_head."))
    assert head == [
        "lm_head.cluster_bias", "lm_head.cluster_weight", "lm_head.out_layers.0.bias", "lm_head.out_layers.1.bias",
        "lm_head.out_layers.2.bias", "lm_head.out_projs.0.weight",
    ]  # fmt: skip
    model, info = AutoModelForCausalLM.from_pretrained(sharded, output_loading_info=True)
    assert not any(info.values()), info
    assert {name for name, _ in model.named_parameters()} == set(weights(sharded))
    embedding = model.transformer.word_emb
    for cluster in range(3):
        weight, _, proj = model.lm_head._cluster_params(cluster, embedding)
        assert weight is embedding.emb_layers[cluster].weight
        assert (proj is embedding.emb_projs[cluster].weight) == (cluster > 0)
    reference = AutoModelForCausalLM.from_pretrained(single)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, reference.eval()(ids).logits, atol=1e-5, rtol=0)


# --- resuming with another number of processes --------------------------------------------------------------------


def test_resume_with_fewer_processes_is_refused_and_changes_nothing(fsdp_run):
    """A 2-process checkpoint (each process's memory and stream position) resumed by 1 process: one error line
    naming both counts and the fix, before anything in the run directory is touched."""
    from test_train import assert_one_line_error, file_times, run_train

    out, _ = fsdp_run
    before = file_times(out)
    args = [*TRAIN, "--output_dir", str(out), "--max_train_steps", "12", "--resume_from_checkpoint", "latest"]
    result = run_train(args, check=False)
    assert_one_line_error(result, "was written by 2 process(es) but this run has 1")
    assert "Resume with --num_processes 2." in result.stderr
    assert file_times(out) == before


def test_resume_with_more_processes_is_refused_and_changes_nothing(adaptive_runs):
    """A 1-process checkpoint resumed by 2 processes: each process stops with the same error, nothing changes. (The
    two processes share stderr and their lines can run together, so the messages are counted, not the lines; the
    launcher adds torch's ChildFailedError report after them.)"""
    from test_train import file_times

    _, single = adaptive_runs
    before = file_times(single)
    result = launch(
        [*FSDP2_FLAGS, "--num_processes", "2"], single, *ADAPTIVE, "--max_train_steps", "8",
        "--resume_from_checkpoint", "latest", port=29568, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    message = f"train.py: error: Checkpoint {checkpoint(single, 4)} was written by 1 process(es) but this run has 2;"
    assert result.stderr.count(message) == 2, result.stderr[-3000:]
    assert result.stderr.count("Resume with --num_processes 1.") == 2
    frames = [line for line in result.stderr.splitlines() if 'File "' in line]  # "[rank0]:   File ..." included
    assert not [f for f in frames if "hf_txl" in f or "train.py" in f], result.stderr[-3000:]  # the launcher's only
    assert file_times(single) == before
