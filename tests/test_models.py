import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from utils import models
from utils.models import (ARCHITECTURES, build_from_config, check_layer_indices, decoder_layers,
                          default_device_and_dtype, load_model, tiny_model, tiny_tokenizer)


def test_tiny_models_run_forward_and_generate(tiny):
    name, model, tokenizer = tiny
    encoded = tokenizer("The cat sat", return_tensors="pt")
    logits = model(**encoded.to(model.device)).logits
    assert logits.shape == (1, encoded["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    output = model.generate(**encoded, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] == encoded["input_ids"].shape[1] + 4


def test_tiny_models_are_deterministic_per_seed():
    a, _ = tiny_model("tiny-qwen3", seed=1)
    b, _ = tiny_model("tiny-qwen3", seed=1)
    c, _ = tiny_model("tiny-qwen3", seed=2)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(a(ids).logits, b(ids).logits)
    assert not torch.equal(a(ids).logits, c(ids).logits)


def test_tiny_tokenizer_round_trips_any_text_and_has_chat_template():
    tokenizer = tiny_tokenizer()
    text = "Grüße, naïve café! 123 \n tabs\t"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")
    assert tokenizer.pad_token_id == 258 and tokenizer.eos_token_id == 257


def test_tiny_save_and_reload_with_plain_transformers_gives_same_logits(tiny, tmp_path):
    name, model, _ = tiny
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=model.dtype).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    ids = ids.to(model.device)
    assert torch.equal(model(ids).logits, reloaded.to(model.device)(ids).logits)


def test_reference_architectures_on_meta_have_expected_sizes():
    sizes = {name: sum(p.numel() for p in build_from_config(name).parameters()) for name in ARCHITECTURES}
    assert sizes["smollm2-135m"] == 134_515_008  # the embedded model's real count
    assert 1.2e9 < sizes["llama-3.2-1b"] < 1.3e9
    assert 7.9e9 < sizes["llama-3.1-8b"] < 8.1e9
    assert 70.0e9 < sizes["llama-3.1-70b"] < 71.0e9
    assert next(build_from_config("mistral-7b").parameters()).device.type == "meta"


def test_default_device_and_dtype_on_cpu(monkeypatch):
    monkeypatch.delenv("REARCH_DTYPE", raising=False)
    device, dtype = default_device_and_dtype("cpu")
    assert device.type == "cpu" and dtype == torch.float32
    assert default_device_and_dtype("cpu", "bfloat16")[1] == torch.bfloat16
    monkeypatch.setenv("REARCH_DTYPE", "fp16")
    assert default_device_and_dtype("cpu")[1] == torch.float16
    monkeypatch.setenv("REARCH_DTYPE", "half")
    with pytest.raises(ValueError, match="REARCH_DTYPE"):
        default_device_and_dtype("cpu")


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown model 'not-a-model'.*embedded"):
        load_model("not-a-model")
    with pytest.raises(ValueError, match="Unknown tiny architecture"):
        tiny_model("tiny-gpt5")
    with pytest.raises(ValueError, match="Unknown architecture"):
        build_from_config("llama-99b")


def test_local_folder_loads_through_the_same_call(tmp_path):
    model, tokenizer = tiny_model("tiny-llama")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model(str(tmp_path), dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3]])
    ids = ids.to(model.device)
    assert torch.equal(model(ids).logits, loaded.to(model.device)(ids).logits)
    assert loaded_tokenizer("abc")["input_ids"] == tokenizer("abc")["input_ids"]


def test_layer_index_checks():
    model, _ = tiny_model("tiny-llama")
    assert len(decoder_layers(model)) == 4
    assert check_layer_indices(model, [3, 0]) == [0, 3]
    with pytest.raises(ValueError, match=r"out of range.*valid indices are 0..3"):
        check_layer_indices(model, [4])
    with pytest.raises(ValueError, match="Duplicate"):
        check_layer_indices(model, [1, 1])
    with pytest.raises(ValueError, match="Cannot find the decoder blocks"):
        decoder_layers(torch.nn.Linear(2, 2))


@pytest.mark.skipif(os.environ.get("REARCH_SKIP_EMBEDDED") == "1", reason="the GPU lane does not carry the model wheel")
def test_embedded_conversion_is_atomic_when_interrupted(tmp_path, monkeypatch):
    """An interruption during conversion leaves no cache folder behind; the next call converts fully."""
    calls = {"n": 0}
    real_save = models.PreTrainedModel.save_pretrained

    def failing_save(self, *args, **kwargs):
        calls["n"] += 1
        real_save(self, *args, **kwargs)  # the weights are written ...
        raise KeyboardInterrupt("simulated interruption")  # ... then the process is stopped

    monkeypatch.setattr(models.PreTrainedModel, "save_pretrained", failing_save)
    with pytest.raises(KeyboardInterrupt):
        models.ensure_embedded_cache(tmp_path, verbose=False)
    assert calls["n"] == 1
    assert not (tmp_path / models.EMBEDDED_CACHE_NAME).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-convert-")]

    monkeypatch.setattr(models.PreTrainedModel, "save_pretrained", real_save)
    folder = models.ensure_embedded_cache(tmp_path, verbose=False)
    marker = json.loads((folder / models.CACHE_MARKER).read_text())
    assert marker["parameters"] == 134_515_008
    assert (folder / "model.safetensors").is_file()


def test_half_written_cache_without_marker_is_not_loaded(tmp_path, monkeypatch):
    """A folder at the cache path without the completion marker is replaced, not trusted."""
    stale = tmp_path / models.EMBEDDED_CACHE_NAME
    stale.mkdir()
    (stale / "config.json").write_text("{ broken")
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: (_ for _ in ()).throw(FileNotFoundError("no wheel")))
    with pytest.raises(FileNotFoundError):
        models.ensure_embedded_cache(tmp_path, verbose=False)
    assert stale.exists()  # untouched until a complete conversion can replace it


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("REARCH_CACHE_DIR", str(tmp_path / "c"))
    assert models.cache_root() == tmp_path / "c"
    assert os.path.isdir(tmp_path / "c")


def test_architecture_summary_and_versions():
    from utils.models import architecture_summary, build_config, library_versions
    from transformers import set_seed

    summary = architecture_summary(build_config(ARCHITECTURES["smollm2-135m"]))
    assert summary["layers"] == 30 and summary["kv heads"] == 3 and summary["head dim"] == 64
    assert summary["KV bytes/token (bf16)"] == 2 * 30 * 3 * 64 * 2
    assert library_versions()["torch"].startswith("2.")
    set_seed(3)
    a = torch.rand(2)
    set_seed(3)
    assert torch.equal(a, torch.rand(2))
