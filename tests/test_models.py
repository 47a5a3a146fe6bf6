"""lshe.models: the tiny random model (always) and the real SmolLM2-135M-Instruct (marked real_model)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from lshe.models import MODEL_NAMES, load_model, model_info


def test_tiny_llama_loads_fast_with_gqa() -> None:
    load_model("tiny-llama")  # warm up lazy imports inside transformers
    start = time.perf_counter()
    model, tokenizer = load_model("tiny-llama")
    assert time.perf_counter() - start < 0.5
    info = model_info(model)
    assert info["name"] == "tiny-llama"
    assert info["n_kv_heads"] < info["n_heads"]
    assert info["n_heads"] % info["n_kv_heads"] == 0
    assert info["head_dim"] * info["n_heads"] == model.config.hidden_size
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    assert info["attn_implementation"] == "sdpa"
    assert not model.training
    assert model.config.vocab_size == len(tokenizer)


def test_tiny_llama_is_deterministic_and_leaves_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    model_a, tokenizer = load_model("tiny-llama", seed=0)
    model_b, _ = load_model("tiny-llama", seed=0)
    model_c, _ = load_model("tiny-llama", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)

    inputs = tokenizer(["The pass key is 12345."], return_tensors="pt")
    out_a = model_a.generate(**inputs, max_new_tokens=16, do_sample=False)
    out_b = model_b.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert torch.equal(out_a, out_b)
    assert not torch.equal(model_a.model.embed_tokens.weight, model_c.model.embed_tokens.weight)


def test_tiny_tokenizer_round_trips_bytes() -> None:
    _, tokenizer = load_model("tiny-llama")
    text = "Héllo, wörld!\n\tpass key: 00042 日本語 🙂"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte, no bos added
    assert ids[:5] == list(b"H\xc3\xa9ll")
    assert tokenizer.decode(ids) == text


def test_tiny_tokenizer_specials_and_chat_template() -> None:
    model, tokenizer = load_model("tiny-llama")
    assert tokenizer.padding_side == "left"
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    messages = [{"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id in ids


def test_left_padding_gives_the_same_greedy_output() -> None:
    model, tokenizer = load_model("tiny-llama")
    kwargs = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    batch = tokenizer(["hi", "hello there, long prompt"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0] == tokenizer.pad_token_id and batch["attention_mask"][0, 0] == 0
    alone = tokenizer(["hi"], return_tensors="pt")
    out_batch = model.generate(**batch, **kwargs)
    out_alone = model.generate(**alone, **kwargs)
    assert torch.equal(out_batch.sequences[0, -8:], out_alone.sequences[0, -8:])
    for step_batch, step_alone in zip(out_batch.logits, out_alone.logits, strict=True):
        torch.testing.assert_close(step_batch[0], step_alone[0], atol=1e-5, rtol=1e-5)


def test_options_are_applied() -> None:
    model, _ = load_model("tiny-llama", dtype="bfloat16", attn_implementation="eager", device="auto")
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert model.device.type == expected


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"dtype must be one of \['bfloat16', 'float16', 'float32'\]"):
        load_model("tiny-llama", dtype="fp32")
    with pytest.raises(ValueError, match="device must be"):
        load_model("tiny-llama", device="gpu")
    with pytest.raises(ValueError, match="unknown model 'no-such-model'") as info:
        load_model("no-such-model")
    assert all(name in str(info.value) for name in MODEL_NAMES)


def test_local_directory_loads_and_gets_a_pad_token(tmp_path: Path) -> None:
    model, tokenizer = load_model("tiny-llama")
    tokenizer.pad_token = None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    loaded, loaded_tokenizer = load_model(str(tmp_path), attn_implementation="eager")
    assert loaded_tokenizer.pad_token == loaded_tokenizer.eos_token
    assert loaded_tokenizer.padding_side == "left"
    assert loaded_tokenizer.chat_template is not None
    assert loaded.config._attn_implementation == "eager"
    assert model_info(loaded)["name"] == str(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.real_model
def test_smollm2_shape_and_answer() -> None:
    model, tokenizer = load_model("smollm2-135m")
    info = model_info(model)
    assert (info["n_layers"], info["n_heads"], info["n_kv_heads"], info["head_dim"]) == (30, 9, 3, 64)
    assert info["name"] == "smollm2-135m"
    assert tokenizer.chat_template is not None
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.padding_side == "left"

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def _fake_gguf_conversion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[int]:
    """`smollm2_dir`'s conversion with tiny-llama standing in for the GGUF (offline, instant).

    Returns a list that gets one entry per conversion."""
    from types import SimpleNamespace

    from lshe import models

    conversions: list[int] = []

    def from_pretrained(*args, **kwargs):
        conversions.append(1)
        model, _ = load_model("tiny-llama")
        model.config.quantization_config = {"quant_method": "gguf"}  # what the GGUF loader leaves
        return model

    monkeypatch.setenv("LSHE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "fetch_asset", lambda asset: tmp_path / "model.gguf")
    monkeypatch.setattr(models, "AutoModelForCausalLM", SimpleNamespace(from_pretrained=from_pretrained))
    monkeypatch.setattr(
        models, "AutoTokenizer", SimpleNamespace(from_pretrained=lambda *a, **k: models.tiny_tokenizer())
    )
    return conversions


def test_smollm2_conversion_saves_no_quantization_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`"quantization_config": null` in the converted config.json makes transformers < 5.3 fail to load it."""
    import json

    from transformers import AutoConfig

    from lshe.models import smollm2_dir

    conversions = _fake_gguf_conversion(monkeypatch, tmp_path)
    path = smollm2_dir()
    assert conversions == [1]
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 2 and config["model_type"] == "llama"
    assert not hasattr(AutoConfig.from_pretrained(path), "quantization_config")


def test_smollm2_copy_with_quantization_config_is_repaired_on_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy converted before the fix (key present, null) is rewritten without it, nothing else changed."""
    import json

    from lshe.models import smollm2_dir

    conversions = _fake_gguf_conversion(monkeypatch, tmp_path)
    path = smollm2_dir()
    config_file = path / "config.json"
    before = json.loads(config_file.read_text())
    before.pop("quantization_config", None)
    config_file.write_text(json.dumps({**before, "quantization_config": None}, indent=2))
    weights = (path / "model.safetensors").read_bytes()

    assert smollm2_dir() == path
    assert conversions == [1]  # repaired in place, not converted again
    repaired = json.loads(config_file.read_text())
    assert "quantization_config" not in repaired and repaired == before
    assert (path / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in path.iterdir() if p.name.startswith(".")) == []  # no temporary file left
    loaded, _ = load_model(str(path))
    assert loaded.config.num_hidden_layers == 2


@pytest.mark.real_model
def test_smollm2_cached_config_has_no_quantization_config() -> None:
    import json

    from lshe.models import smollm2_dir

    assert "quantization_config" not in json.loads((smollm2_dir() / "config.json").read_text())
