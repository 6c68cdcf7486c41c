"""transformers 4.x ``transfo-xl`` checkpoints: loading, conversion, equality with 4.35.2, safe vocabularies.

The fixtures in tests/fixtures/legacy/ were written by the real transformers 4.35.2 (scripts/make_legacy_fixtures.py):
random weights saved with ``save_pretrained`` and the 4.x log-probabilities of a sequence fed in two segments, and
(``long_generation``) the 4.x greedy decoding one token at a time far past ``mem_len``.
"""

import importlib.util
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import hand_memory_logits, stepwise_logits
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import hf_txl  # noqa: F401  (registers model_type "transfo-xl")
from hf_txl import TxlConfig, TxlForCausalLM
from hf_txl.legacy import (
    TxlLegacyConfig,
    TxlLegacyForCausalLM,
    TxlLegacyModel,
    convert_vocab_pkl,
    safe_load_vocab_pkl,
)

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "legacy"
MODELS = sorted(
    p.name for p in FIXTURES.iterdir() if (p / "reference.json").is_file() and (p / "config.json").is_file()
)
TOLERANCE = 1e-5


def load_converter():
    spec = importlib.util.spec_from_file_location("convert_legacy", ROOT / "scripts" / "convert_legacy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_two_segments(model, reference):
    """Log-probabilities of both segments, the second continuing the first's memory."""
    ids = torch.tensor(reference["input_ids"])
    first_len, _ = reference["segments"]
    with torch.no_grad():
        first = model(ids[:, :first_len])
        second = model(ids[:, first_len:], mems=first.mems)
    # Adaptive models return log-probabilities already; plain ones logits (log_softmax is then the 4.x output).
    return [out.logits.log_softmax(-1) for out in (first, second)]


def max_diffs(model, name):
    reference = json.loads((FIXTURES / name / "reference.json").read_text())
    return [
        (ours - torch.tensor(theirs)).abs().max().item()
        for ours, theirs in zip(run_two_segments(model, reference), reference["log_probs"])
    ]


def test_fixtures_cover_the_issue():
    configs = {name: json.loads((FIXTURES / name / "config.json").read_text()) for name in MODELS}
    assert len(configs) >= 6 and all(c["model_type"] == "transfo-xl" for c in configs.values())
    assert {c["div_val"] for c in configs.values() if c["cutoffs"]} >= {1, 4}
    assert any(not c["cutoffs"] for c in configs.values()) and any(len(c["cutoffs"]) >= 3 for c in configs.values())
    for field in ("pre_lnorm", "same_length", "untie_r"):
        assert {c[field] for c in configs.values()} == {True, False}, field
    assert any(c["clamp_len"] > 0 for c in configs.values())
    assert any((FIXTURES / name / "pytorch_model.bin").is_file() for name in MODELS)
    assert sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file()) < 1_000_000


@pytest.mark.parametrize("name", MODELS)
def test_auto_model_matches_transformers_4x(name):
    assert isinstance(AutoConfig.from_pretrained(FIXTURES / name), TxlLegacyConfig)
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / name)
    assert type(model) is TxlLegacyForCausalLM and not model.training
    assert model.config.legacy_zero_mems
    diffs = max_diffs(model, name)
    assert max(diffs) < TOLERANCE, diffs


@pytest.mark.parametrize("name", ["adaptive_div4", "plain"])
def test_without_zero_mems_the_first_segment_differs(name):
    """The 4.x zero memory matters: the original empty memory gives other first-segment outputs."""
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / name, legacy_zero_mems=False)
    first, _ = max_diffs(model, name)
    assert first > 1e-3


def test_auto_model_base_class_loads_the_decoder():
    model = AutoModel.from_pretrained(FIXTURES / "adaptive_div1")
    full = AutoModelForCausalLM.from_pretrained(FIXTURES / "adaptive_div1")
    assert type(model) is TxlLegacyModel
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, full.transformer(ids).last_hidden_state)


@pytest.mark.parametrize("name", MODELS)
def test_converted_native_directory_matches(name, tmp_path):
    load_converter().convert(FIXTURES / name, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "hf_txl" and config["legacy_zero_mems"] is True
    assert {"model.safetensors", "configuration_txl.py", "modeling_txl.py"} <= {p.name for p in tmp_path.iterdir()}
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pkl"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(model) is TxlForCausalLM
    diffs = max_diffs(model, name)
    assert max(diffs) < TOLERANCE, diffs


def test_converter_command_line(tmp_path):
    out = tmp_path / "native"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "convert_legacy.py"), str(FIXTURES / "adaptive_div4"), str(out)],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    )  # fmt: skip
    assert "legacy_zero_mems" in result.stdout and (out / "model.safetensors").is_file()


def test_bin_checkpoint_is_read_with_weights_only(monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    AutoModelForCausalLM.from_pretrained(FIXTURES / "plain_proj_bin")
    assert calls == [True]


class _RunsCode:
    def __reduce__(self):
        return (eval, ("__import__('os').environ.__setitem__('HF_TXL_PWNED', '1')",))


def test_malicious_bin_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TXL_PWNED", raising=False)
    shutil.copy(FIXTURES / "plain_proj_bin" / "config.json", tmp_path / "config.json")
    torch.save({"transformer.word_emb.emb_layers.0.weight": _RunsCode()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "HF_TXL_PWNED" not in __import__("os").environ


@pytest.mark.parametrize(
    "field, value",
    [("sample_softmax", 100), ("attn_type", 2), ("tie_projs", [True, True, True]), ("tie_projs", [False, True, False])],
)
def test_unsupported_legacy_fields_are_named(field, value, tmp_path):
    shutil.copytree(FIXTURES / "adaptive_div4", tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"`{field}="):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_shape_mismatch_lists_the_keys(tmp_path):
    shutil.copytree(FIXTURES / "adaptive_div1", tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vocab_size"] = 130  # weights hold 120 tokens
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shape mismatch") as error:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "transformer.word_emb.emb_layers.0.weight: checkpoint (120, 16) vs model (130, 16)" in str(error.value)
    assert "lm_head.out_layers.0.bias" in str(error.value)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    shutil.copytree(FIXTURES / "adaptive_div1", tmp_path, dirs_exist_ok=True)
    state = load_file(tmp_path / "model.safetensors")
    state["crit.mystery"] = state.pop("crit.cluster_bias")
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"missing keys \['lm_head.cluster_bias'\].*unexpected keys \['crit.mystery'\]"
    ):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_legacy_config_translation():
    config = TxlLegacyConfig.from_pretrained(FIXTURES / "adaptive_div4")
    assert (config.cutoffs, config.div_val, config.d_embed, config.proj_share_all_but_first) == ([20, 70], 4, 32, True)
    assert config.tie_word_embeddings and config.legacy_zero_mems
    native = config.to_native()
    assert type(native) is TxlConfig and native.model_type == "hf_txl" and native.cutoffs == [20, 70]
    untied = TxlLegacyConfig.from_pretrained(FIXTURES / "adaptive_div4_untied")
    assert not untied.proj_share_all_but_first and not untied.tie_word_embeddings


# --- vocab.pkl ---------------------------------------------------------------------------------------------


def test_malicious_vocab_pkl_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TXL_PWNED", raising=False)
    payload = pickle.dumps({"idx2sym": ["a"], "x": _RunsCode()})
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        safe_load_vocab_pkl(payload)
    (tmp_path / "vocab.pkl").write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError):
        convert_vocab_pkl(tmp_path / "vocab.pkl", tmp_path / "out")
    assert "HF_TXL_PWNED" not in __import__("os").environ
    for module, name in [("os", "system"), ("subprocess", "Popen"), ("builtins", "getattr"), ("posix", "system")]:
        crafted = b"\x80\x04" + f"c{module}\n{name}\n".encode() + b"."
        with pytest.raises(pickle.UnpicklingError, match=f"{module}.{name}"):
            safe_load_vocab_pkl(crafted)


def test_benign_vocab_pkl_converts_to_a_word_level_tokenizer(tmp_path):
    plain = {"idx2sym": ["<eos>", "<unk>", "hello", "world"], "lower_case": True, "x": (b"\xff", {1.5}, None)}
    assert safe_load_vocab_pkl(pickle.dumps(plain, protocol=2)) == plain
    convert_vocab_pkl(pickle.dumps(plain, protocol=2), tmp_path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert tokenizer("Hello there world").input_ids == [2, 1, 3]
    assert tokenizer.unk_token == "<unk>" and tokenizer.eos_token == "<eos>"


def test_real_4x_vocab_pkl_converts_and_matches_4x_ids(tmp_path):
    """vocab.pkl written by 4.35.2 save_vocabulary (it also pickles Moses objects and regexes: made inert)."""
    reference = json.loads((FIXTURES / "vocab" / "reference.json").read_text())
    convert_vocab_pkl(FIXTURES / "vocab" / "vocab.pkl", tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer(reference["text"]).input_ids == reference["ids"]
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(len(reference["vocab"]))] == reference["vocab"]


LOGITS = dict(do_sample=False, return_dict_in_generate=True, output_logits=True)


def test_legacy_model_generates_with_its_memory():
    """Eight greedy steps of a 4.x checkpoint (mem_len 4): the first is the 4.35.2 first segment's last position,
    every one the segment recurrence (model cache, and memory by hand), and every later one uses its memory."""
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / "adaptive_div4")
    reference = json.loads((FIXTURES / "adaptive_div4" / "reference.json").read_text())
    prompt = torch.tensor(reference["input_ids"])[:, :4]  # the first segment of the reference
    out = model.generate(prompt, max_new_tokens=8, **LOGITS)
    sequence, logits = out.sequences, torch.stack(out.logits)  # [2, 12], [8, 2, V] log-probabilities
    assert sequence.shape == (2, 12) and torch.equal(sequence[:, 4:], logits.argmax(-1).T)
    torch.testing.assert_close(logits[0], torch.tensor(reference["log_probs"][0])[:, -1], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(logits, stepwise_logits(model, sequence, 4), atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(logits, hand_memory_logits(model, sequence, 4), atol=TOLERANCE, rtol=0)
    with torch.no_grad():  # each fed token alone (after the 4.x zero memory) predicts otherwise than with its memory
        alone = torch.stack([model(sequence[:, t : t + 1]).logits[:, -1] for t in range(4, 11)])  # [7, 2, V]
    assert (alone - logits[1:]).abs().amax(-1).min() > 0.05


@pytest.mark.parametrize("name", ["long_generation", "long_generation_plain"])
def test_long_generation_matches_transformers_4x(name):
    """Greedy decoding far past mem_len (more than 3 x mem_len new tokens), which transformers 4.35.2 did one token
    per forward call with its memory (scripts/make_legacy_fixtures.py): generate() on the legacy checkpoint gives
    the same tokens and every step's log-probabilities, and so does the recurrence by hand. ``long_generation``:
    adaptive softmax and same_length + clamp_len (the wt103 settings); ``long_generation_plain``: full softmax,
    pre-norm, every step seeing its whole memory."""
    directory = FIXTURES / name
    reference = json.loads((directory / "generation.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert type(model) is TxlLegacyForCausalLM and model.config.legacy_zero_mems
    model.generation_config.eos_token_id = None  # the 4.x loop did not stop at the end-of-sequence token
    prompt, theirs = torch.tensor(reference["prompt"]), torch.tensor(reference["log_probs"])  # [B, P], [N, B, V]
    steps, prompt_len = theirs.shape[0], prompt.shape[1]
    assert steps > 3 * model.config.mem_len
    out = model.generate(prompt, max_new_tokens=steps, **LOGITS)
    assert out.sequences[:, prompt_len:].tolist() == reference["tokens"]
    close = dict(atol=1e-4, rtol=0)  # measured <= 3.1e-5 (log-probs down to -122); without the memory: 4 or more
    torch.testing.assert_close(torch.stack(out.logits).log_softmax(-1), theirs, **close)
    for by_hand in (stepwise_logits, hand_memory_logits):
        torch.testing.assert_close(by_hand(model, out.sequences, prompt_len).log_softmax(-1), theirs, **close)
    with torch.no_grad():  # the memory matters on these weights: each fed token alone predicts otherwise
        alone = [model(out.sequences[:, t : t + 1]).logits[:, -1] for t in range(prompt_len, prompt_len + steps - 1)]
    assert (torch.stack(alone).log_softmax(-1) - theirs[1:]).abs().amax(-1).min() > 0.5
