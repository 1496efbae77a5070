import pytest
import torch

from utils.data import (CORPORA, SPLITS, analogy_questions, calibration_batches, load_corpus, load_labeled,
                        split_of, token_ids)
from utils.models import tiny_tokenizer


@pytest.mark.parametrize("name", ["wikipedia", "news", "sms"])
def test_splits_are_disjoint_and_cover_the_corpus(name):
    everything = load_corpus(name, "all")
    parts = {split: load_corpus(name, split) for split in SPLITS}
    for split, documents in parts.items():
        assert documents, f"{split} split of {name} is empty"
    seen = set()
    for documents in parts.values():
        assert not seen & set(documents)
        seen |= set(documents)
    assert seen == set(everything)
    assert len(everything) == len(set(everything))  # duplicates removed: none can leak across splits


def test_splits_are_deterministic():
    assert load_corpus("sms", "calibration") == load_corpus("sms", "calibration")
    assert split_of("some text") == split_of("some text")


def test_wikipedia_is_clean_prose():
    documents = load_corpus("wikipedia", "all")
    assert 80 <= len(documents) <= 110
    text = "\n".join(documents)
    for markup in ("[[", "]]", "{{", "}}", "<ref", "{|", "thumb|"):
        assert markup not in text, markup
    assert sum(len(d.split()) for d in documents) > 300_000


def test_sms_labels_and_sizes():
    messages = load_labeled("sms", "all")
    labels = {label for _, label in messages}
    assert labels == {"ham", "spam"}
    assert 4000 < len(messages) < 5000
    assert all(label is None for _, label in load_labeled("news", "eval"))


def test_token_ids_exact_length_and_too_small_split_error():
    tokenizer = tiny_tokenizer()
    ids = token_ids(tokenizer, "news", "eval", max_tokens=1000)
    assert ids.shape == (1000,) and ids.dtype == torch.long
    with pytest.raises(ValueError, match="holds only"):
        token_ids(tokenizer, "sms", "validation", max_tokens=10**8)


def test_calibration_batches_packed_and_padded():
    tokenizer = tiny_tokenizer()
    batches = calibration_batches(tokenizer, "wikipedia", n_samples=10, seq_len=32, batch_size=4)
    assert [b["input_ids"].shape for b in batches] == [(4, 32), (4, 32), (2, 32)]
    assert all(b["attention_mask"].all() for b in batches)
    padded = calibration_batches(tokenizer, "sms", n_samples=8, seq_len=64, batch_size=8, packed=False)
    assert len(padded) == 1
    mask = padded[0]["attention_mask"]
    assert (mask == 0).any() and (mask.sum(1) > 0).all()
    assert (padded[0]["input_ids"][mask == 0] == tokenizer.pad_token_id).all()


def test_calibration_request_larger_than_corpus_is_a_clear_error():
    with pytest.raises(ValueError, match="calibration.*holds only"):
        calibration_batches(tiny_tokenizer(), "news", n_samples=100_000, seq_len=512)
    with pytest.raises(ValueError, match="holds only"):
        calibration_batches(tiny_tokenizer(), "news", n_samples=100_000, seq_len=16, packed=False)
    with pytest.raises(ValueError, match="n_samples must be an integer >= 1, got 0"):
        calibration_batches(tiny_tokenizer(), "news", n_samples=0)


def test_unknown_corpus_and_split_are_clear_errors():
    with pytest.raises(ValueError, match="Unknown corpus 'reddit'.*wikipedia"):
        load_corpus("reddit")
    with pytest.raises(ValueError, match="Unknown split 'test'.*calibration"):
        load_corpus("sms", "test")


def test_every_corpus_has_attribution_and_analogies_load():
    assert all(info.attribution and info.license for info in CORPORA.values())
    questions = analogy_questions()
    assert len(questions) == 19544
    assert questions[0] == ("capital-common-countries", ["Athens", "Greece", "Baghdad", "Iraq"])


def test_sms_splits_are_disjoint_on_normalized_text():
    from utils.data import normalized_text

    assert normalized_text("WIN a £1000 prize! Call 0800-123") == normalized_text("win a £2,500 prize. call 0900-999")
    owner = {}
    for split in SPLITS:
        for text in load_corpus("sms", split):
            key = normalized_text(text)
            assert owner.setdefault(key, split) == split, f"{text!r} folds onto a message of the {owner[key]} split"
    everything = load_corpus("sms", "all")
    assert len({normalized_text(text) for text in everything}) == len(everything)  # near-duplicates folded once


def bos_model():
    """The tiny Llama with a tokenizer that begins every text with BOS (id 256), as Llama 3 and Gemma do."""
    from utils.models import tiny_model

    model, _ = tiny_model("tiny-llama")
    return model, tiny_tokenizer(add_bos=True)


def test_text_begins_with_bos_where_the_tokenizer_adds_one():
    from utils.data import bos_ids

    _, tokenizer = bos_model()
    assert bos_ids(tokenizer) == [256] and bos_ids(tiny_tokenizer()) == []
    plain = token_ids(tiny_tokenizer(), "news", "eval", max_tokens=3000)
    with_bos = token_ids(tokenizer, "news", "eval", max_tokens=3000)
    assert with_bos[0] == 256 and 256 not in plain.tolist()
    documents = 1 + plain.tolist().count(10) // 2 - 1  # "\n\n" closes each document: BOS opens each one
    assert with_bos.tolist().count(256) >= min(documents, 2)
    for packed in (True, False):
        batches = calibration_batches(tokenizer, "news", n_samples=4, seq_len=32, batch_size=2, packed=packed)
        assert all((batch["input_ids"][:, 0] == 256).all() for batch in batches)
        assert all(batch["input_ids"].shape[1] <= 32 for batch in batches)
        plain_batches = calibration_batches(tiny_tokenizer(), "news", n_samples=4, seq_len=32, batch_size=2, packed=packed)
        assert not any((batch["input_ids"] == 256).any() for batch in plain_batches)


def test_perplexity_windows_and_plain_generation_begin_with_bos():
    from utils.evaluation import generate, perplexity

    model, tokenizer = bos_model()
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"][:, 0].tolist()),
                                           with_kwargs=True)
    stream = token_ids(tiny_tokenizer(), "news", "eval", max_tokens=100)  # a stream without BOS
    with_bos = perplexity(model, stream, window=32, batch_size=2, progress=False, bos_token_id=256)
    assert seen and all(first == [256] * len(first) for first in seen)
    seen.clear()
    without = perplexity(model, stream, window=32, batch_size=2, progress=False)
    assert 256 not in sum(seen, []) and with_bos != without
    seen.clear()
    generate(model, tokenizer, "Hello", max_new_tokens=2, chat=False)
    assert seen[0] == [256]
    seen.clear()
    generate(model, tiny_tokenizer(), "Hello", max_new_tokens=2, chat=False)
    assert seen[0] == tiny_tokenizer()("H", add_special_tokens=False)["input_ids"]
    hook.remove()


def test_perplexity_with_bos_scores_every_token_once():
    """With the BOS in front, each window holds one stream token less; every token but the first is scored."""
    from unittest import mock

    from utils import evaluation

    model, _ = bos_model()
    stream = torch.arange(10, 110)  # no BOS in it
    counts = []
    real = evaluation.batch_nll

    def counting(*args, **kwargs):
        nll, count = real(*args, **kwargs)
        counts.append(count)
        return nll, count

    with mock.patch.object(evaluation, "batch_nll", counting):
        evaluation.perplexity(model, stream, window=16, stride=8, batch_size=3, progress=False, bos_token_id=256)
    assert sum(counts) == len(stream) - 1
