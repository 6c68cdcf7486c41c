"""Publishing: train.py --push_to_hub and scripts/push_to_hub.py hand the exact folder and repo id to
huggingface_hub (mocked: tests cannot reach the Hub); failures are reported, never a success; the published
folder loads without hf_txl (trust_remote_code=True) and generates."""

import shutil
from pathlib import Path

import huggingface_hub
import pytest
from conftest import run_without_hf_txl
from test_evaluate import load_script

from hf_txl.training.data import DEFAULT_CORPUS_PATH
from hf_txl.training.hub import IGNORE_PATTERNS, HubPushError, push_model_dir


class FakeHfApi:
    """Records what would be sent to the Hub."""

    calls: list = []
    fail_with: Exception | None = None

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, kwargs))
        if FakeHfApi.fail_with is not None:
            raise FakeHfApi.fail_with

    def upload_folder(self, **kwargs):
        FakeHfApi.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()


@pytest.fixture
def fake_hub(monkeypatch):
    FakeHfApi.calls, FakeHfApi.fail_with = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return FakeHfApi


@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory):
    """scripts/train.py --push_to_hub, in process, with the Hub mocked; returns (output_dir, recorded calls)."""
    root = tmp_path_factory.mktemp("run")
    text = Path(DEFAULT_CORPUS_PATH).read_text()
    (root / "train.txt").write_text(text[:20000])
    (root / "valid.txt").write_text(text[20000:24000])
    out = root / "out"
    patch = pytest.MonkeyPatch()
    FakeHfApi.calls, FakeHfApi.fail_with = [], None
    patch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    patch.setenv("HF_TOKEN", "hf_test_token")
    try:
        load_script("train").main([
            "--preset", "tiny", "--max_train_steps", "12", "--logging_steps", "2", "--output_dir", str(out),
            "--train_file", str(root / "train.txt"), "--validation_file", str(root / "valid.txt"),
            "--push_to_hub", "--hub_model_id", "someone/txl-tiny",
        ])  # fmt: skip
        calls = list(FakeHfApi.calls)
    finally:
        patch.undo()
    return out, calls


def test_train_push_to_hub_uploads_the_output_dir_to_the_repo(pushed_run):
    out, calls = pushed_run
    assert [(name, repo) for name, repo, _ in calls] == [("create_repo", "someone/txl-tiny"),
                                                         ("upload_folder", "someone/txl-tiny")]  # fmt: skip
    upload = calls[1][2]
    assert Path(upload["folder_path"]) == out and upload["repo_type"] == "model"
    assert upload["ignore_patterns"] == IGNORE_PATTERNS
    card = (out / "README.md").read_text()
    assert 'from_pretrained("someone/txl-tiny")' in card and (out / "loss_curve.png").is_file()


def test_push_script_hands_the_exact_folder_and_repo_id(tmp_path, pushed_run, fake_hub, capsys):
    model_dir = tmp_path / "copy"
    shutil.copytree(pushed_run[0], model_dir)
    load_script("push_to_hub").main([str(model_dir), "org/other-name", "--private"])
    (_, repo, create), (_, repo2, upload) = fake_hub.calls
    assert repo == repo2 == "org/other-name" and create["private"] is True
    assert Path(upload["folder_path"]) == model_dir
    assert "Pushed" in capsys.readouterr().out
    assert 'from_pretrained("org/other-name")' in (model_dir / "README.md").read_text()  # card names the repo


def test_no_token_or_no_network_is_an_error_not_a_success(tmp_path, pushed_run, fake_hub, monkeypatch, capsys):
    model_dir = pushed_run[0]
    push = load_script("push_to_hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", huggingface_hub.HfApi)  # the real client again...
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # ...and no login
    with pytest.raises(SystemExit) as exit_info:
        push.main([str(model_dir), "org/name", "--no_card"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 1 and "Pushed" not in captured.out
    assert "no Hugging Face token" in captured.err and "hf auth login" in captured.err

    fake_hub.fail_with = ConnectionError("Failed to resolve huggingface.co")
    with pytest.raises(HubPushError, match="Nothing was published.*HF_HUB_OFFLINE"):
        push_model_dir(model_dir, "org/name", api=fake_hub())
    assert not [c for c in fake_hub.calls if c[0] == "upload_folder"]


def test_bad_directories_and_repo_ids(tmp_path, pushed_run, fake_hub):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        push_model_dir(tmp_path, "org/name")
    with pytest.raises(ValueError, match="not a Hub repository id"):
        push_model_dir(pushed_run[0], "no-owner")
    assert fake_hub.calls == []


LOAD_WITHOUT_HF_TXL = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
out = model.generate(**tokenizer("ROMEO:", return_tensors="pt"), max_new_tokens=10, do_sample=False)
print(json.dumps({"text": tokenizer.decode(out[0]), "module": type(model).__module__}))
"""


def test_published_folder_loads_in_a_clean_environment_and_generates(tmp_path, pushed_run):
    published = tmp_path / "published"  # what upload_folder sends: the directory minus the ignored patterns
    shutil.copytree(pushed_run[0], published, ignore=shutil.ignore_patterns("checkpoints", "*.tmp", ".tmp*"))
    remote = run_without_hf_txl(LOAD_WITHOUT_HF_TXL, published, tmp_path=tmp_path)
    assert remote["module"].startswith("transformers_modules")
    assert remote["text"].startswith("ROMEO:") and len(remote["text"]) >= len("ROMEO:") + 10
