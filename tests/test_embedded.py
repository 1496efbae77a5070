"""The real embedded model: loading, a sane perplexity band, and a factual answer."""

import time

from utils.data import token_ids
from utils.evaluation import count_parameters, generate, perplexity
from utils.models import ensure_embedded_cache, load_model


def test_embedded_shape(embedded):
    model, tokenizer = embedded
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert count_parameters(model)["total"] == 134_515_008
    assert tokenizer.chat_template


def test_embedded_loads_from_cache_quickly(embedded):
    ensure_embedded_cache()
    start = time.perf_counter()
    load_model("embedded")
    assert time.perf_counter() - start < 60  # generous: the 5 s target is measured by benchmarks/, not here


def test_embedded_perplexity_in_sane_band(embedded):
    model, tokenizer = embedded
    ids = token_ids(tokenizer, "wikipedia", "eval", max_tokens=2048)
    assert 10 < perplexity(model, ids, window=512, progress=False) < 40


def test_embedded_knows_the_capital_of_france(embedded):
    model, tokenizer = embedded
    assert "Paris" in generate(model, tokenizer, "What is the capital of France?", max_new_tokens=20)
