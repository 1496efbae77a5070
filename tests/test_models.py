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
    with pytest.raises(TypeError, match="indices.*string"):
        check_layer_indices(model, "12")  # not blocks 1 and 2
    with pytest.raises(TypeError, match="indices.*integers"):
        check_layer_indices(model, [1.0])
    with pytest.raises(TypeError, match="indices.*integers"):
        check_layer_indices(model, [True])
    assert check_layer_indices(model, torch.tensor([2, 1])) == [1, 2]
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


# ---------------------------------------------------------------------------------------------------
# The self-verifying cache: checksums, rebuilds, concurrent converters, any GGUF file
# ---------------------------------------------------------------------------------------------------

def write_tiny_gguf(path) -> None:
    """A real GGUF file (llama layout, f32 tensors, byte-level tokenizer) from the tiny Llama: 2 s to convert."""
    from gguf import GGUFWriter

    model, tokenizer = tiny_model("tiny-llama")
    c = model.config
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_vocab_size(c.vocab_size)
    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    merged = ["\u0120\u0120", "\u0120\u0120\u0120\u0120"]
    tokens += merged + [f"<|unused{i}|>" for i in range(c.vocab_size - len(tokens) - len(merged))]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3] * (len(tokens) - 256))
    # Two merges, not one: transformers before 5.2x reads a one-element GGUF array as a bare string, and
    # its tokenizer converter then splits that string character by character ("failed to extract enum PyMerges").
    writer.add_token_merges(["\u0120 \u0120", "\u0120\u0120 \u0120\u0120"])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
    writer.add_pad_token_id(258)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        else:
            parts = name.split(".")
            gguf_name = f"blk.{parts[2]}.{names['.'.join(parts[3:-1])]}.weight"
        writer.add_tensor(gguf_name, tensor.detach().float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tiny_writer(calls: list):
    def write(folder):
        calls.append(folder)
        model, tokenizer = tiny_model("tiny-llama")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return {"parameters": sum(p.numel() for p in model.parameters())}
    return write


def test_cache_detects_flipped_truncated_and_missing_files_and_rebuilds(tmp_path):
    calls = []
    folder = models.verified_cache(tmp_path / "m", tiny_writer(calls), verbose=False)
    marker = json.loads((folder / models.CACHE_MARKER).read_text())
    assert set(marker["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert models.cache_problems(folder) == []
    assert models.verified_cache(folder, tiny_writer(calls), verbose=False) == folder and len(calls) == 1

    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    for position in range(len(data) - 4000, len(data) - 1000):  # a few thousand flipped bytes in the weights
        data[position] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert models.cache_problems(folder) == ["model.safetensors does not match its sha256 (modified or corrupted)"]
    models.verified_cache(folder, tiny_writer(calls), verbose=False)
    assert len(calls) == 2 and models.cache_problems(folder) == []

    with open(weights, "r+b") as handle:
        handle.truncate(1000)
    assert "truncated" in models.cache_problems(folder)[0]
    (folder / "tokenizer.json").unlink()
    assert "tokenizer.json is missing" in models.cache_problems(folder)
    models.verified_cache(folder, tiny_writer(calls), verbose=False)
    assert len(calls) == 3 and models.cache_problems(folder) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-convert-", ".broken-"))]


def test_broken_embedded_cache_without_the_wheel_names_the_folder(tmp_path, monkeypatch):
    """No raw safetensors error and no 'a hub id needs network access': the message names the folder."""
    folder = models.verified_cache(tmp_path / models.EMBEDDED_CACHE_NAME, tiny_writer([]), verbose=False)
    with open(folder / "model.safetensors", "r+b") as handle:
        handle.truncate(100)
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: (_ for _ in ()).throw(FileNotFoundError("no wheel")))
    with pytest.raises(FileNotFoundError, match=f"cache folder {folder}.*fails its check.*truncated"):
        load_model("embedded", cache_dir=tmp_path)
    (folder / models.CACHE_MARKER).write_text(json.dumps({"source": "old", "parameters": 1}))  # an old marker
    with pytest.raises(FileNotFoundError, match="records no checksums"):
        load_model("embedded", cache_dir=tmp_path)


RACER = """
import os, sys, time
from pathlib import Path
from utils.models import tiny_model, verified_cache

def write(folder):
    (Path(sys.argv[2]) / f"wrote-{os.getpid()}").touch()
    time.sleep(1.0)  # widen the window in which a racing converter could interfere
    model, tokenizer = tiny_model("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {}

print(verified_cache(Path(sys.argv[1]), write, verbose=False))
"""


def test_concurrent_converters_in_real_processes_convert_once_and_never_delete_a_complete_cache(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "racer.py"
    script.write_text(RACER)
    final, log = tmp_path / "cache" / "m", tmp_path / "log"
    log.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(models.__file__).parent.parent), "OMP_NUM_THREADS": "1"}

    def race(n):
        processes = [subprocess.Popen([sys.executable, str(script), str(final), str(log)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
        results = [process.communicate(timeout=300) for process in processes]
        assert [process.returncode for process in processes] == [0] * n, [err[-2000:] for _, err in results]
        assert all(out.strip() == str(final) for out, _ in results)

    race(2)
    assert len(list(log.iterdir())) == 1  # one conversion; the other waited on the lock and found it done
    assert models.cache_problems(final) == []
    marker_time = (final / models.CACHE_MARKER).stat().st_mtime_ns
    calls = []
    assert models.verified_cache(final, tiny_writer(calls), verbose=False) == final
    assert not calls and (final / models.CACHE_MARKER).stat().st_mtime_ns == marker_time  # used, not rewritten
    assert not [p for p in final.parent.iterdir() if p.name.startswith((".tmp-convert-", ".broken-"))]


def test_any_local_gguf_file_loads_through_the_verified_cache(tmp_path):
    from transformers import GgufConfig

    gguf = tmp_path / "tiny-model.gguf"
    write_tiny_gguf(gguf)
    model, tokenizer = load_model(str(gguf), dtype=torch.float32, cache_dir=tmp_path / "cache")
    folder = tmp_path / "cache" / models.gguf_cache_name(gguf)
    assert models.cache_problems(folder) == []
    direct = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf.name, dtype=torch.float32,
                                                  quantization_config=GgufConfig(dequantize=True)).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert torch.equal(model.cpu()(ids).logits, direct(ids).logits)
    assert tokenizer.decode(tokenizer("hello world")["input_ids"]) == "hello world"
    model.save_pretrained(tmp_path / "saved")  # dequantized at load: save_pretrained works
    marker_time = (folder / models.CACHE_MARKER).stat().st_mtime_ns
    load_model(gguf, dtype=torch.float32, cache_dir=tmp_path / "cache")  # a Path works too; no reconversion
    assert (folder / models.CACHE_MARKER).stat().st_mtime_ns == marker_time
    with pytest.raises(ValueError, match="gguf must be the path of a .gguf file"):
        models.ensure_gguf_cache(tmp_path / "saved" / "config.json", cache_dir=tmp_path / "cache")
