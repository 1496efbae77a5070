"""The one clock of the course (utils.speed.stopwatch) and the timing helpers built on it."""

from __future__ import annotations

import time

import pytest

from utils.speed import interleaved_samples, interleaved_timings, stopwatch, timed_call


def test_stopwatch_reads_wall_and_cpu_seconds_since_it_started():
    elapsed = stopwatch()
    time.sleep(0.05)  # wall time passes, this process's CPU time hardly does
    first = elapsed()
    assert set(first) == {"wall_s", "cpu_s"}
    assert first["wall_s"] >= 0.05 and 0 <= first["cpu_s"] < first["wall_s"]
    sum(i * i for i in range(200_000))  # CPU work
    second = elapsed()
    assert second["wall_s"] > first["wall_s"] and second["cpu_s"] > first["cpu_s"]


def test_stopwatch_on_the_cpu_device_and_bad_devices():
    assert stopwatch("cpu")()["wall_s"] >= 0
    with pytest.raises(TypeError, match="device"):
        stopwatch(3.5)


def test_interleaved_samples_times_every_kept_round_and_prefers_a_returned_float():
    calls = []
    samples = interleaved_samples({"sleep": lambda: calls.append("sleep") or time.sleep(0.01),
                                   "own clock": lambda: calls.append("own") or 0.5}, repeats=3, warmup=2)
    assert calls == ["sleep", "own"] * 5  # interleaved, warm-up rounds included
    assert len(samples["sleep"]) == 3 and all(s >= 0.01 for s in samples["sleep"])
    assert samples["own clock"] == [0.5, 0.5, 0.5]
    assert interleaved_timings({"own clock": lambda: 0.25}, repeats=2) == {"own clock": 0.25}


def test_timed_call_reads_the_same_clocks_as_stopwatch():
    result, seconds = timed_call(lambda: time.sleep(0.02) or "done")
    assert result == "done" and set(seconds) == {"wall_s", "cpu_s"} and seconds["wall_s"] >= 0.02


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen3", "tiny-gemma3"])
def test_greedy_tokens_are_generate_greedy_and_the_prefill_keeps_the_last_logits_only(family):
    # the timed loop must decode what transformers' greedy `generate` decodes; its prefill asks the LM head for the
    # last position only (`logits_to_keep=1`, as generate does), so a long prompt does not time a full-width head
    import torch
    from utils.models import tiny_model
    from utils.speed import greedy_tokens
    model, _ = tiny_model(family)
    prompt = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    shapes = []
    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, output: shapes.append(tuple(output.shape)))
    try:
        loop = greedy_tokens(model, prompt, 5)
    finally:
        hook.remove()
    assert shapes[0] == (2, 1, model.config.vocab_size)  # the prefill: one position per row
    expected = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                              min_new_tokens=5, do_sample=False)[:, prompt.shape[1]:]
    assert torch.equal(loop, expected)


def test_a_lora_model_also_prefills_the_last_logits_only():
    # a PEFT model's forward does not name `logits_to_keep` but passes it to its base model (utils.models.last_logits_only)
    import torch
    from peft import LoraConfig, get_peft_model
    from utils.models import tiny_model
    from utils.speed import greedy_tokens
    model, _ = tiny_model("tiny-llama")
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    prompt = torch.randint(3, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    shapes = []
    hook = lora.get_output_embeddings().register_forward_hook(lambda module, args, output: shapes.append(tuple(output.shape)))
    try:
        greedy_tokens(lora, prompt, 3)
    finally:
        hook.remove()
    assert shapes[0] == (1, 1, model.config.vocab_size)
