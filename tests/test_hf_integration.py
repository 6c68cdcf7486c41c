"""transformers integration: config, Auto classes, save/load, remote code, training utilities, bad input."""

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import run_without_hf_txl, tiny_config
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from hf_txl import TxlConfig, TxlForCausalLM, TxlForSequenceClassification, TxlModel

# --- configuration -------------------------------------------------------------------------------------


def test_config_defaults_are_the_enwik8_base_model_and_aliases_work():
    config = TxlConfig()
    assert (config.n_layer, config.d_model, config.n_head, config.d_head, config.d_inner) == (
        12,
        512,
        8,
        64,
        2048,
    )
    assert config.mem_len == 512 and config.tie_word_embeddings
    assert config.hidden_size == 512 and config.num_hidden_layers == 12 and config.num_attention_heads == 8
    config.hidden_size = 64
    assert config.d_model == 64


def test_importing_the_model_leaves_the_data_pipeline_unloaded():
    """`import hf_txl` for the model alone does not import datasets / pyarrow / pandas (the data pipeline's
    dependencies); its names load on first use."""
    code = textwrap.dedent("""
        import sys
        import hf_txl
        from hf_txl import TxlForCausalLM, TxlCharTokenizer
        heavy = [m for m in ("datasets", "pyarrow", "pandas") if m in sys.modules]
        assert not heavy, heavy
        from hf_txl import DEFAULT_CORPUS_PATH, StreamBatcher, load_corpus, tokenize_to_array
        import hf_txl.training.data
        assert load_corpus is hf_txl.training.data.load_corpus and "datasets" in sys.modules
        assert set(hf_txl._LAZY_DATA_NAMES) <= set(dir(hf_txl)) and __import__("os").path.exists(DEFAULT_CORPUS_PATH)
        try:
            hf_txl.not_a_name
        except AttributeError as error:
            assert "not_a_name" in str(error)
        else:
            raise AssertionError("no AttributeError")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_model_type_does_not_collide_with_transformers():
    assert TxlConfig.model_type not in CONFIG_MAPPING_NAMES
    assert AutoConfig.for_model(TxlConfig.model_type, d_model=16).d_model == 16


@pytest.mark.parametrize(
    "field,value",
    [
        ("d_model", 0), ("d_model", -4), ("n_layer", 0), ("n_head", 1.5), ("d_head", 0), ("d_inner", None),
        ("vocab_size", 0), ("mem_len", -1), ("clamp_len", -2), ("dropout", 1.0), ("dropout", -0.1),
        ("dropatt", 1.5), ("layer_norm_epsilon", 0), ("init_std", -1.0),
    ],
)  # fmt: skip
def test_invalid_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        TxlConfig(**{field: value})


def test_same_length_without_memory_is_rejected():
    with pytest.raises(ValueError, match="same_length"):
        TxlConfig(same_length=True, mem_len=0)


# --- Auto classes, save / load, remote code ----------------------------------------------------------------


def test_auto_classes_resolve_and_round_trip_is_exact(tmp_path):
    model = TxlForCausalLM(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "configuration_txl.py",
        "modeling_txl.py",
        "cache_txl.py",
        "adaptive_txl.py",
        "kernels_txl.py",
    } <= files
    assert not any(name.endswith((".bin", ".pkl", ".pt")) for name in files)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_txl.TxlForCausalLM"
    assert saved["auto_map"]["AutoConfig"] == "configuration_txl.TxlConfig"

    assert isinstance(AutoConfig.from_pretrained(tmp_path), TxlConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is TxlForCausalLM
    assert type(AutoModel.from_pretrained(tmp_path)) is TxlModel
    ids = torch.randint(1, 40, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.word_emb.weight.data_ptr()


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    try:
        import hf_txl  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("hf_txl is importable; the test would prove nothing")
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert "hf_txl" not in type(model).__module__.split(".")[0], type(model).__module__
    ids = torch.tensor(json.loads(sys.argv[2]))
    with torch.no_grad():
        out = model(ids)
        second = model(ids, cache=out.cache)  # the memory, from the shipped cache_txl.py
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    kernels = [name for name in sys.modules if name.endswith(".kernels_txl")]  # the shipped kernel choices
    result = {"logits": out.logits.tolist(), "generated": generated.tolist(), "module": type(model).__module__,
              "second": second.logits.tolist(), "cache": type(out.cache).__module__, "kernels": kernels}
    print(json.dumps(result))
    """
)


def test_trust_remote_code_load_without_hf_txl_gives_identical_logits(tmp_path):
    model = TxlForCausalLM(tiny_config()).eval()
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    ids = torch.randint(1, 40, (2, 7))
    remote = run_without_hf_txl(REMOTE_CODE_SCRIPT, model_dir, json.dumps(ids.tolist()), tmp_path=tmp_path)
    assert remote["module"].startswith("transformers_modules")
    assert remote["cache"].startswith("transformers_modules") and remote["cache"].endswith("cache_txl")
    assert len(remote["kernels"]) == 1 and remote["kernels"][0].startswith("transformers_modules")
    with torch.no_grad():
        first = model(ids)
        assert torch.equal(torch.tensor(remote["logits"]), first.logits)
        torch.testing.assert_close(torch.tensor(remote["second"]), model(ids, cache=first.cache).logits, atol=0, rtol=0)
    assert remote["generated"] == model.generate(ids, max_new_tokens=5, do_sample=False).tolist()


# --- training utilities -----------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_gradients():
    config = tiny_config(mem_len=8)
    plain = TxlForCausalLM(copy.deepcopy(config)).train()
    checkpointed = TxlForCausalLM(copy.deepcopy(config)).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.activation_checkpointing_enable()
    assert checkpointed.transformer.gradient_checkpointing
    ids = torch.randint(1, 40, (2, 6))
    for model in (plain, checkpointed):
        mems = model(ids).mems
        model(ids, mems=mems, labels=ids).loss.backward()
    for (name, p1), (_, p2) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_tied_and_untied_embeddings():
    tied = TxlForCausalLM(tiny_config())
    assert tied.lm_head.weight is tied.transformer.word_emb.weight
    untied = TxlForCausalLM(tiny_config(tie_word_embeddings=False))
    assert untied.lm_head.weight is not untied.transformer.word_emb.weight
    assert not torch.equal(untied.lm_head.weight, untied.transformer.word_emb.weight)


def test_resize_token_embeddings_keeps_old_tokens_and_tying():
    model = TxlForCausalLM(tiny_config()).eval()
    ids = torch.randint(1, 40, (1, 6))
    with torch.no_grad():
        before = model(ids).logits
    model.resize_token_embeddings(48)
    assert model.config.vocab_size == 48
    assert model.transformer.word_emb.weight.shape == (48, 32)
    assert model.lm_head.weight.shape == (48, 32) and model.lm_head.bias.shape == (48,)
    assert model.lm_head.weight is model.transformer.word_emb.weight
    with torch.no_grad():
        after = model(ids).logits
        torch.testing.assert_close(after[..., :40], before, atol=1e-6, rtol=1e-6)
        model(torch.tensor([[47]]))  # new ids are accepted


def test_init_weights_initialises_u_v_and_layer_norms():
    model = TxlForCausalLM(tiny_config(init_std=0.05, n_layer=4, d_model=64, d_head=16))
    biases = torch.cat(
        [torch.cat([l.attn.r_w_bias.flatten(), l.attn.r_r_bias.flatten()]) for l in model.transformer.layers]
    )
    assert 0.035 < biases.std().item() < 0.065 and abs(biases.mean().item()) < 0.02
    weight = model.transformer.layers[0].attn.qkv_proj.weight
    assert 0.04 < weight.std().item() < 0.06
    norm = model.transformer.layers[0].ff.layer_norm
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and torch.equal(
        norm.bias, torch.zeros_like(norm.bias)
    )
    shared = TxlModel(tiny_config(untie_r=False))
    assert shared.r_w_bias.abs().sum() > 0 and not hasattr(shared.layers[0].attn, "r_w_bias")


def test_return_dict_false_gives_tuples():
    model = TxlForCausalLM(tiny_config()).eval()
    ids = torch.randint(1, 40, (1, 4))
    loss, logits, mems = model(ids, labels=ids, return_dict=False)
    assert loss.dim() == 0 and logits.shape == (1, 4, 40) and len(mems) == 2


# --- sequence classification --------------------------------------------------------------------------------


def test_sequence_classification_pools_last_real_token():
    config = tiny_config(num_labels=3)
    model = TxlForSequenceClassification(config).eval()
    assert type(AutoModelForSequenceClassification.from_config(copy.deepcopy(config))) is TxlForSequenceClassification
    seq = torch.randint(1, 40, (1, 5))
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], 1)
    right = torch.cat([seq, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask_left = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = model(seq).logits
        torch.testing.assert_close(model(left, attention_mask=mask_left).logits, alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(right, attention_mask=mask_left.flip(1)).logits, alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(right).logits, alone, atol=1e-5, rtol=1e-5)  # pad_token_id=0
    out = model(seq, labels=torch.tensor([2]))
    assert out.logits.shape == (1, 3) and out.loss.dim() == 0
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([2])))


# --- bad input ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model():
    return TxlForCausalLM(tiny_config(mem_len=8)).eval()


def test_ids_outside_vocabulary(small_model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        small_model(torch.tensor([[1, 40]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        small_model(torch.tensor([[-1, 2]]))


def test_both_or_neither_inputs(small_model):
    with pytest.raises(ValueError, match="exactly one of `input_ids`"):
        small_model()
    with pytest.raises(ValueError, match="exactly one of `input_ids`"):
        small_model(torch.tensor([[1]]), inputs_embeds=torch.zeros(1, 1, 32))


def test_inputs_embeds_equal_input_ids(small_model):
    ids = torch.randint(1, 40, (2, 5))
    embeds = small_model.get_input_embeddings()(ids)
    with torch.no_grad():
        torch.testing.assert_close(small_model(inputs_embeds=embeds).logits, small_model(ids).logits)


def test_attention_mask_of_wrong_shape(small_model):
    with pytest.raises(ValueError, match="`attention_mask` must have shape"):
        small_model(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="`attention_mask` must have shape"):
        small_model(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(3))


def test_one_dimensional_input_ids(small_model):
    with pytest.raises(ValueError, match="batch-first"):
        small_model(torch.tensor([1, 2, 3]))


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda m: [t[:1] for t in m], "batch"),
        (lambda m: list(m)[:1], "layers"),
        (lambda m: [t[..., :16] for t in m], "d_model"),
        (lambda m: [t.double() for t in m], "dtype"),
        (lambda m: [t.to("meta") for t in m], "is on meta"),
        (lambda m: "not a memory", "`mems` must be"),
    ],
)
def test_mismatched_mems(small_model, change, match):
    ids = torch.randint(1, 40, (2, 3))
    with torch.no_grad():
        mems = small_model(ids).mems
    with pytest.raises(ValueError, match=match):
        small_model(ids, mems=change(mems))
