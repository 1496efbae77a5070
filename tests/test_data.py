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
    with pytest.raises(ValueError, match="seq_len"):
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
