"""scripts/generate.py (sampling controls, per-character streaming, unknown characters) and the
text-generation pipeline, with hf_txl and (trust_remote_code) without it."""

from pathlib import Path

import pytest
import torch
from conftest import run_without_hf_txl
from test_evaluate import load_script, make_model_dir

from hf_txl.training.data import DEFAULT_CORPUS_PATH


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    make_model_dir(path, Path(DEFAULT_CORPUS_PATH).read_text()[:5000])
    return path


@pytest.fixture(scope="module")
def generate():
    return load_script("generate")


def test_greedy_output_streams_character_by_character_and_equals_generate(model_dir, generate, capsys, monkeypatch):
    chunks = []
    original = generate.CharStreamer.on_finalized_text

    def record(self, text, stream_end=False):
        chunks.append(text)
        original(self, text, stream_end)

    monkeypatch.setattr(generate.CharStreamer, "on_finalized_text", record)
    text = generate.main([str(model_dir), "--prompt", "ROMEO:", "--max_new_tokens", "12", "--greedy"])
    printed = capsys.readouterr().out
    assert printed == text + "\n"
    generated_chunks = [c for c in chunks[1:] if c]
    assert len(generated_chunks) == 12 and all(len(c) <= 5 for c in generated_chunks)  # one token ("<pad>" is 5)

    model, tokenizer = generate.load_model_and_tokenizer(model_dir)
    ids = tokenizer("ROMEO:", return_tensors="pt")
    expected = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert text == tokenizer.decode(expected[0])


def test_sampling_controls_are_seeded(model_dir, generate, capsys):
    args = [str(model_dir), "--prompt", "ROMEO:", "--max_new_tokens", "20", "--temperature", "0.7", "--top_k", "5",
            "--top_p", "0.9", "--no_stream"]  # fmt: skip
    first = generate.main([*args, "--seed", "1"])
    assert generate.main([*args, "--seed", "1"]) == first
    assert generate.main([*args, "--seed", "2"]) != first
    assert capsys.readouterr().out.count("ROMEO:") == 3


def test_unknown_prompt_characters_warn_and_map_to_unk(model_dir, generate, capsys):
    text = generate.main([str(model_dir), "--prompt", "ROMEO é€", "--max_new_tokens", "3", "--no_stream"])
    err = capsys.readouterr().err
    assert "2 character(s) of the prompt are not in the model's vocabulary" in err and "'é'" in err
    assert text.startswith("ROMEO <unk><unk>")


def test_bad_input(tmp_path, model_dir, generate):
    with pytest.raises(SystemExit, match="not a model directory"):
        generate.main([str(tmp_path), "--prompt", "a"])
    (tmp_path / "m").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "m" / name).write_bytes((model_dir / name).read_bytes())
    with pytest.raises(SystemExit, match="tokenizer is missing"):
        generate.main([str(tmp_path / "m"), "--prompt", "a"])
    with pytest.raises(SystemExit, match="--prompt is empty"):
        generate.main([str(model_dir), "--prompt", ""])
    with pytest.raises(SystemExit, match="--temperature must be > 0"):
        generate.main([str(model_dir), "--temperature", "0"])


def test_pipeline_after_import_hf_txl(model_dir):
    from transformers import pipeline

    import hf_txl  # noqa: F401

    generator = pipeline("text-generation", model=str(model_dir))
    out = generator("ROMEO:", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    model, tokenizer = load_script("generate").load_model_and_tokenizer(model_dir)
    expected = model.generate(**tokenizer("ROMEO:", return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert out == tokenizer.decode(expected[0])


PIPELINE_WITHOUT_HF_TXL = """
import json, sys
from transformers import pipeline
generator = pipeline("text-generation", model=sys.argv[1], trust_remote_code=True)
out = generator("ROMEO:", max_new_tokens=8, do_sample=False)[0]["generated_text"]
print(json.dumps({"text": out, "module": type(generator.model).__module__}))
"""


def test_pipeline_with_trust_remote_code_where_hf_txl_is_not_importable(tmp_path, model_dir):
    remote = run_without_hf_txl(PIPELINE_WITHOUT_HF_TXL, model_dir, tmp_path=tmp_path)
    assert remote["module"].startswith("transformers_modules")
    model, tokenizer = load_script("generate").load_model_and_tokenizer(model_dir)
    with torch.no_grad():
        expected = model.generate(**tokenizer("ROMEO:", return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert remote["text"] == tokenizer.decode(expected[0])


def loaded_models(script, monkeypatch) -> list:
    """Every model the script loads, recorded."""
    models, real = [], script.load_model_and_tokenizer

    def load(*args, **kwargs):
        model, tokenizer = real(*args, **kwargs)
        models.append(model)
        return model, tokenizer

    monkeypatch.setattr(script, "load_model_and_tokenizer", load)
    return models


def test_dtype_and_quantize_flags_load_bf16_and_int8_weights(model_dir, generate, monkeypatch):
    models = loaded_models(generate, monkeypatch)
    args = [str(model_dir), "--prompt", "ROMEO:", "--max_new_tokens", "6", "--greedy", "--no_stream"]
    text = generate.main([*args, "--dtype", "bfloat16"])
    assert text.startswith("ROMEO:") and models[-1].dtype == torch.bfloat16
    pytest.importorskip("torchao.quantization", reason="int8 needs torchao (hf_txl[quantization])")
    text = generate.main([*args, "--quantize", "int8"])
    weight = models[-1].transformer.layers[0].ff.fc_in.weight
    assert text.startswith("ROMEO:") and type(weight).__name__ == "Int8Tensor" and weight.qdata.dtype == torch.int8


def test_quantize_without_torchao_names_the_extra(model_dir, generate, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # as if torchao were not installed
    with pytest.raises(SystemExit, match=r"int8 quantization needs torchao.*pip install 'hf_txl\[quantization\]'"):
        generate.main([str(model_dir), "--prompt", "a", "--quantize", "int8"])
