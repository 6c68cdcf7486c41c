"""Training from an installed (non-editable) wheel, outside the repository: ``python -m hf_txl.train`` and
``accelerate launch -m hf_txl.train`` run, and the export writes the model card from the packaged template."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_ONLY = ("tests", "bench", "scripts", "runs", "build", "dist", ".*", "*.egg-info", "__pycache__")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """hf_txl built as a wheel from a copy of the source tree and installed (``--target``) into a fresh folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*SOURCE_ONLY))
    (source / "hf_txl" / "training" / "model_card.md").unlink(missing_ok=True)  # the build must put it there itself
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", source], check=True)
    (wheel,) = (tmp / "dist").glob("hf_txl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packaged = ("hf_txl/training/model_card.md", "hf_txl/training/corpus/tiny_shakespeare.txt",
                "hf_txl/training/metrics/txl_lm/txl_lm.py", "hf_txl/kernels_txl.py")  # fmt: skip
    assert all(name in names for name in packaged), [name for name in packaged if name not in names]
    subprocess.run([*pip, "install", "--no-deps", "--target", tmp / "site", wheel], check=True)
    return tmp / "site"


def run_outside(installed: Path, command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(cwd / "hf_home"), "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_wheel_is_imported_not_the_checkout(installed, tmp_path):
    result = run_outside(installed, [sys.executable, "-c", "import hf_txl; print(hf_txl.__file__)"], tmp_path)
    assert result.stdout.strip().startswith(str(installed)), result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["python", "accelerate"])
def test_train_from_the_installed_package(installed, tmp_path, launch):
    flags = ["--preset", "tiny", "--max_train_steps", "3", "--max_eval_steps", "2", "--output_dir", "out"]
    prefix = [sys.executable, "-m", "hf_txl.train"]
    if launch == "accelerate":
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "-m", "hf_txl.train"]
    result = run_outside(installed, [*prefix, *flags], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    card = (out / "README.md").read_text()
    assert "Transformer-XL" in card and "loss_curve.png" in card
    assert json.loads((out / "eval_results.json").read_text())["step"] == 3
    check = "from transformers import AutoModelForCausalLM as A; m = A.from_pretrained('out'); print(type(m).__name__)"
    loaded = run_outside(installed, [sys.executable, "-c", "import hf_txl; " + check], tmp_path)
    assert loaded.stdout.strip() == "TxlForCausalLM", loaded.stderr[-2000:]
