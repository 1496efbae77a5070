"""Measuring a model: perplexity, greedy generation, parameter counts, size, speed, and lm-eval tasks.

The lm-eval tasks are YAML files over the course's offline corpora, written into the cache folder on
first use, and run on a model held in memory (no hub access).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import logging
import math
import random
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from tqdm.auto import tqdm

from .checks import (check_bool, check_int, check_module, check_optional_int, check_str, check_tensor,
                     check_token_ids, model_vocab_size)
from .data import analogy_questions, atomic_write_text, bos_ids, load_labeled
from .models import cache_root, compute_autocast, cpu_autocast_dtype, model_device


@torch.no_grad()
def batch_nll(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              score_mask: torch.Tensor | None = None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of a batch, and the number of tokens it covers.

    Token t is scored as the prediction made at position t-1. Tokens where `attention_mask` is 0
    (padding) are never scored; `score_mask` (same shape, 1 = score) can exclude more, such as the
    context part of a sliding window. The forward pass runs under `utils.models.compute_autocast` (bfloat16
    matrix products on a CPU with bfloat16 units, REARCH_CPU_AUTOCAST=off for float32); the loss is float32.
    """
    check_module("model", model)
    check_token_ids("input_ids", input_ids, model_vocab_size(model), dim=2)
    for mask_name, mask in (("attention_mask", attention_mask), ("score_mask", score_mask)):
        if mask is not None and check_tensor(mask_name, mask).shape != input_ids.shape:
            raise ValueError(f"{mask_name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(mask.shape)}.")
    device = model_device(model)
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    scored = attention_mask.bool()
    if score_mask is not None:
        scored &= score_mask.to(device).bool()
    with compute_autocast(model):  # bfloat16 matrix products on a CPU with bfloat16 units (utils.models)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    targets = input_ids[:, 1:].masked_fill(~scored[:, 1:], -100)
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return nll.item(), int((targets != -100).sum())


def perplexity(model: nn.Module, input_ids: torch.Tensor, window: int = 512, stride: int | None = None,
               batch_size: int = 4, progress: bool = True, bos_token_id: int | None = None) -> float:
    """Perplexity of a 1-D token stream with a sliding window, weighted by token.

    Windows of `window` tokens start every `stride` tokens (default: no overlap). Each token is scored
    once: in a window, only the tokens not scored by the previous window count, the rest are context.
    Windows are batched (`batch_size`) with the short last window padded and its padding masked. For
    a model whose tokenizer begins every text with a BOS token (`utils.data.bos_ids`), pass it as
    `bos_token_id`: every window that does not already begin with it gets it in front (as context, never
    scored), as the model expects; None (the default, right for SmolLM2) adds nothing.
    """
    check_module("model", model)
    check_token_ids("input_ids", input_ids, model_vocab_size(model), dim=1)
    if len(input_ids) < 2:
        raise ValueError("input_ids must hold at least 2 token ids (see data.token_ids).")
    window = check_int("window", window, minimum=2)
    stride = check_optional_int("stride", stride, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    check_bool("progress", progress)
    bos_token_id = check_optional_int("bos_token_id", bos_token_id, minimum=0)
    stride = stride or window
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in 1..window ({window}), got {stride}.")
    if bos_token_id is not None:
        vocab = model_vocab_size(model)
        if vocab is not None and bos_token_id >= vocab:
            raise ValueError(f"bos_token_id {bos_token_id} is beyond the model's vocabulary of {vocab} tokens.")
        if window < 3:
            raise ValueError(f"window must be at least 3 with a bos_token_id, got {window}.")
    lead = 0 if bos_token_id is None else 1
    body = window - lead  # stream tokens per window; the BOS, where given, takes one place
    stride = min(stride, body)
    n = len(input_ids)
    spans = []  # (begin, end, first scored position inside the window)
    scored_until = 0
    for begin in range(0, n, stride):
        end = min(begin + body, n)
        spans.append((begin, end, max(scored_until - begin, 0)))
        scored_until = end
        if end == n:
            break
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(spans), batch_size), desc="perplexity", disable=not progress, leave=False):
        chunk = spans[start:start + batch_size]
        leads = [lead if lead and int(input_ids[begin]) != bos_token_id else 0 for begin, _, _ in chunk]
        width = max(row_lead + end - begin for row_lead, (begin, end, _) in zip(leads, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        score = torch.zeros_like(ids)
        for row, (row_lead, (begin, end, first)) in enumerate(zip(leads, chunk)):
            ids[row, :row_lead] = bos_token_id if row_lead else 0
            ids[row, row_lead:row_lead + end - begin] = input_ids[begin:end]
            mask[row, :row_lead + end - begin] = 1
            # the stream's first token is never scored (nothing of the stream precedes it), BOS or not
            score[row, row_lead + max(first, 1 if begin == 0 else 0):row_lead + end - begin] = 1
        nll, count = batch_nll(model, ids, mask, score)
        total_nll += nll
        total_tokens += count
    return math.exp(total_nll / total_tokens)


# the source of the perplexity computation, part of every cached perplexity's key
_PERPLEXITY_CODE = hashlib.sha256((inspect.getsource(perplexity) + inspect.getsource(batch_nll)).encode()).hexdigest()


def model_fingerprint(model: nn.Module, include_trainable: bool = True) -> str:
    """A SHA-256 of everything that decides a model's outputs: class, config, and every parameter and buffer.

    Names, shapes, dtypes and bytes of the state dict enter the hash, so two models share a fingerprint
    only when they compute the same function (a pruned, trained or re-cast model gets a new one). Reading
    the weights costs about a second for a 135M model. `include_trainable=False` leaves out the parameters
    that require gradients and reads the names without peft's `.base_layer` wrapping: for a peft model in
    training, the fingerprint of the frozen model under its adapter, the same while the adapter learns and
    for adapters of any configuration on that frozen model.
    """
    check_module("model", model)
    check_bool("include_trainable", include_trainable)
    trainable = set() if include_trainable else {name for name, p in model.named_parameters() if p.requires_grad}
    digest = hashlib.sha256()
    digest.update(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in model.state_dict().items():
        if name in trainable:
            continue
        if not include_trainable:
            name = name.replace(".base_layer", "")
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy() if tensor.numel() else b"")
    return digest.hexdigest()


def cached_perplexity(model: nn.Module, input_ids: torch.Tensor, window: int = 512, stride: int | None = None,
                      batch_size: int = 4, progress: bool = True, cache_dir: str | Path | None = None,
                      bos_token_id: int | None = None) -> float:
    """`perplexity`, computed once per model, text and settings and kept in the cache folder.

    The key is a SHA-256 over `model_fingerprint(model)`, the token ids, `window`, `stride`,
    `bos_token_id` (see `perplexity`), the device type, the compute precision
    (`utils.models.cpu_autocast_dtype`), the torch and transformers versions and the source code of `perplexity`
    and `batch_nll` (a change to how perplexity is computed never reuses an old value); the value lives in
    `<cache>/perplexity/<key>.json` (see
    `utils.models.cache_root` for `cache_dir`) with the key fields beside it. A stored file is used only
    when its fields match and its value is a finite number >= 1; anything else (a missing, partial or
    foreign file) is recomputed and written atomically. For baselines that many cells or chapters
    measure, such as the base model on held-out text. `batch_size` only changes speed, so it is not
    part of the key.
    """
    if input_ids.dim() != 1 or len(input_ids) < 2:
        raise ValueError("cached_perplexity expects a 1-D tensor of at least 2 token ids (see data.token_ids).")
    fields = {"model": model_fingerprint(model),
              "tokens": hashlib.sha256(input_ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest(),
              "window": int(window), "stride": None if stride is None else int(stride),
              "bos_token_id": check_optional_int("bos_token_id", bos_token_id, minimum=0),
              "device": model_device(model).type, "compute": str(cpu_autocast_dtype(model)),
              "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
              "code": _PERPLEXITY_CODE}
    return _stored_or_computed(
        "perplexity", fields, cache_dir,
        lambda: perplexity(model, input_ids, window=window, stride=stride, batch_size=batch_size, progress=progress,
                           bos_token_id=bos_token_id),
        lambda value: isinstance(value, (int, float)) and math.isfinite(value) and value >= 1.0)


def _stored_or_computed(kind: str, fields: dict, cache_dir: str | Path | None, compute: Callable[[], object],
                        valid: Callable[[object], bool]) -> object:
    """The value kept in `<cache>/<kind>/<key>.json` for these key `fields`, or `compute()` stored there.

    The key is a SHA-256 over the fields; a stored file is used only when its fields match and `valid(value)`
    holds, anything else (missing, partial, foreign) is recomputed and written atomically."""
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    path = cache_root(cache_dir) / kind / f"{key}.json"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("fields") == fields and valid(stored[kind]):
            return stored[kind]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    value = compute()
    atomic_write_text(path, json.dumps({"fields": fields, kind: value}))
    return value


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 30, chat: bool = True) -> str:
    """Greedy continuation of `prompt` (wrapped in the tokenizer's chat template when `chat`), decoded.

    Without the chat template the prompt begins the way the tokenizer begins a text (`data.bos_ids`:
    the BOS token for Llama 3 or Gemma tokenizers, nothing for SmolLM2); the chat template writes its
    own BOS where the model needs one.
    """
    check_module("model", model)
    check_str("prompt", prompt, empty=True)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, minimum=1)
    check_bool("chat", chat)
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = bos_ids(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("prompt is empty and the tokenizer adds no BOS: there is nothing to continue.")
    input_ids = torch.tensor([ids], dtype=torch.long, device=model_device(model))
    encoded = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _unique_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Named parameters with tied weights counted once (the first name wins)."""
    seen, result = set(), {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) not in seen:
            seen.add(id(parameter))
            result[name] = parameter
    return result


def component_of(name: str) -> str:
    """The component a parameter belongs to, from its name: embedding, attention, mlp, norm, lm_head, other."""
    check_str("name", name, empty=True)
    if "embed" in name:
        return "embedding"
    if "lm_head" in name:
        return "lm_head"
    if "norm" in name or ".ln_" in name:  # before attention: "post_attention_layernorm" is a norm
        return "norm"
    if any(key in name for key in ("self_attn", "attention", ".attn.")):
        return "attention"
    if any(key in name for key in (".mlp.", "feed_forward", ".ffn.")):
        return "mlp"
    return "other"


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts by component (tied embedding and LM head counted once) plus "total"."""
    check_module("model", model, allow_meta=True)
    counts = {"embedding": 0, "attention": 0, "mlp": 0, "norm": 0, "lm_head": 0, "other": 0}
    for name, parameter in _unique_parameters(model).items():
        counts[component_of(name)] += parameter.numel()
    counts["total"] = sum(counts.values())
    return counts


def model_size_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters occupy in their current dtype (tied weights once)."""
    check_module("model", model, allow_meta=True)
    return sum(p.numel() * p.element_size() for p in _unique_parameters(model).values())


# ---------------------------------------------------------------------------------------------------
# lm-eval tasks over the offline corpora
# ---------------------------------------------------------------------------------------------------

LM_EVAL_TASKS = ("rearch_analogy", "rearch_sms_spam")


def _analogy_docs(n_items: int, seed: int) -> list[dict]:
    """Multiple choice: 'a is to b as c is to' with the right d and three wrong d's of the same category."""
    questions = analogy_questions()
    by_category: dict[str, list[list[str]]] = {}
    for category, words in questions:
        by_category.setdefault(category, []).append(words)
    rng = random.Random(seed)
    categories = sorted(by_category)
    docs = []
    for i in range(n_items):
        category = categories[i % len(categories)]
        a, b, c, d = rng.choice(by_category[category])
        answers = sorted({words[3] for words in by_category[category]} - {d, a, b, c})
        choices = rng.sample(answers, 3) + [d]
        rng.shuffle(choices)
        docs.append({"query": f"{a} is to {b} as {c} is to", "choices": choices, "gold": choices.index(d),
                     "category": category})
    return docs


def _sms_docs(n_per_class: int, seed: int) -> list[dict]:
    """Balanced spam/ham classification from the SMS evaluation split only (chance = 0.5)."""
    messages = load_labeled("sms", "eval")
    rng = random.Random(seed)
    docs = []
    for label in ("ham", "spam"):
        pool = [text for text, message_label in messages if message_label == label]
        for text in rng.sample(pool, min(n_per_class, len(pool))):
            docs.append({"text": text, "label": 0 if label == "ham" else 1})
    rng.shuffle(docs)
    return docs


_YAML = {
    "rearch_analogy": """task: rearch_analogy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "rearch_sms_spam": """task: rearch_sms_spam
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Is this SMS message spam or ham (a normal message)?\\nMessage: {{{{text}}}}\\nAnswer:"
doc_to_choice: ["ham", "spam"]
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
}


def write_lm_eval_tasks(folder: str | Path | None = None, analogy_items: int = 280, sms_per_class: int = 100,
                        seed: int = 0) -> Path:
    """Write the course's lm-eval task YAMLs and their JSONL data into `folder` and return it.

    rearch_analogy: word analogies as 4-way multiple choice (the word2vec questions, 14 categories).
    rearch_sms_spam: ham/spam classification on the SMS evaluation split, balanced. Files are written
    atomically, so a folder being written by another process is never read half-done.
    """
    analogy_items = check_int("analogy_items", analogy_items, minimum=1)
    sms_per_class = check_int("sms_per_class", sms_per_class, minimum=1)
    seed = check_int("seed", seed)
    folder = Path(folder) if folder else cache_root() / "lm_eval_tasks" / f"a{analogy_items}-s{sms_per_class}-seed{seed}"
    data = {"rearch_analogy": _analogy_docs(analogy_items, seed), "rearch_sms_spam": _sms_docs(sms_per_class, seed)}
    for task, docs in data.items():
        data_path = folder / f"{task}.jsonl"
        atomic_write_text(data_path, "".join(json.dumps(doc) + "\n" for doc in docs))
        atomic_write_text(folder / f"{task}.yaml", _YAML[task].format(data=json.dumps(str(data_path))))
    return folder


def _check_tasks(tasks: tuple[str, ...]) -> None:
    """A ValueError listing the course's offline tasks when `tasks` names another."""
    unknown = [task for task in tasks if task not in LM_EVAL_TASKS]
    if unknown:
        raise ValueError(f"Unknown tasks {unknown}; the course's offline tasks are: {', '.join(LM_EVAL_TASKS)}")


def run_lm_eval(model: nn.Module, tokenizer, tasks: tuple[str, ...] = LM_EVAL_TASKS, limit: int | None = None,
                batch_size: int = 16, task_folder: str | Path | None = None):
    """Run lm-eval tasks on a model held in memory and return a table (pandas DataFrame).

    Columns: task, metric, value, stderr. `limit` caps the documents per task (for quick tests).
    Unknown task names get a ValueError listing the course's tasks. The model computes in the precision
    of `utils.models.cpu_autocast_dtype`, like `batch_nll` (lm-eval's `mixed_precision_dtype`).
    """
    import pandas as pd
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    _check_tasks(tasks)
    folder = Path(task_folder) if task_folder else write_lm_eval_tasks()
    # lm-eval's chatter (the model-argument warnings, its text progress bars) would fill a notebook's output:
    # its logger is set to ERROR (its handler created here, on the real stderr, so errors still show) and its
    # stderr is collected while it runs; if it fails, that collected output is attached to the error.
    try:
        from lm_eval.utils import setup_logging
        setup_logging(logging.ERROR)
    except ImportError:  # older lm-eval: no handler of its own
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stderr(chatter):
            # lm-eval's own autocast: bfloat16 matrix products on a CPU with bfloat16 units (utils.models)
            wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                           device=str(model_device(model)), mixed_precision_dtype=cpu_autocast_dtype(model))
            results = simple_evaluate(model=wrapped, tasks=list(tasks), limit=limit, log_samples=False,
                                      task_manager=TaskManager(include_path=str(folder), include_defaults=False),
                                      verbosity="ERROR")
    except Exception as error:
        raise RuntimeError(f"lm-eval failed: {error}\nlm-eval's output:\n{chatter.getvalue()[-4000:]}") from error
    rows = []
    for task in tasks:
        for key, value in results["results"][task].items():
            if key.endswith(",none") and not key.startswith(("alias", "sample")) and "_stderr" not in key:
                metric = key.split(",")[0]
                stderr = results["results"][task].get(f"{metric}_stderr,none")
                rows.append({"task": task, "metric": metric, "value": float(value),
                             "stderr": float(stderr) if isinstance(stderr, (int, float)) else float("nan")})
    return pd.DataFrame(rows)


def _folder_digest(folder: Path) -> str:
    """SHA-256 over the names and bytes of the files in `folder` (the lm-eval task YAMLs and their data)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"|" + path.read_bytes())
    return digest.hexdigest()


def cached_lm_eval(model: nn.Module, tokenizer, tasks: tuple[str, ...] = LM_EVAL_TASKS, limit: int | None = None,
                   batch_size: int = 16, task_folder: str | Path | None = None, cache_dir: str | Path | None = None):
    """`run_lm_eval`, computed once per model, tokenizer, tasks and settings and kept in the cache folder.

    The key is a SHA-256 over `model_fingerprint(model)`, the tokenizer's vocabulary, the task names, the
    bytes of the task files, `limit`, `batch_size` (padding can move the last digits), the device type, the
    compute precision (`utils.models.cpu_autocast_dtype`) and the lm-eval, torch and transformers versions and
    the source of `run_lm_eval`; the table lives in
    `<cache>/lm_eval/<key>.json` like `cached_perplexity`'s values, and a missing or damaged file is
    recomputed. For the base model, which several chapters evaluate on the same tasks: the first one pays,
    the others read the result. Returns the same table as `run_lm_eval`.
    """
    import importlib.metadata

    import pandas as pd

    _check_tasks(tasks)
    limit = check_optional_int("limit", limit, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    folder = Path(task_folder) if task_folder else write_lm_eval_tasks()
    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()))
    fields = {"model": model_fingerprint(model), "tokenizer": hashlib.sha256(vocabulary.encode()).hexdigest(),
              "tasks": list(tasks), "task_files": _folder_digest(folder),
              "limit": limit, "batch_size": batch_size,
              "device": model_device(model).type, "compute": str(cpu_autocast_dtype(model)),
              "lm_eval": importlib.metadata.version("lm_eval"),
              "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
              "code": _LM_EVAL_CODE}

    def valid(rows) -> bool:
        return (isinstance(rows, list) and {row.get("task") for row in rows} == set(tasks)
                and all(isinstance(row.get("value"), (int, float)) and math.isfinite(row["value"]) for row in rows))

    rows = _stored_or_computed(
        "lm_eval", fields, cache_dir,
        lambda: run_lm_eval(model, tokenizer, tasks=tasks, limit=limit, batch_size=batch_size,
                            task_folder=folder).to_dict("records"),
        valid)
    return pd.DataFrame(rows)


# the source of the lm-eval run, part of every cached table's key
_LM_EVAL_CODE = hashlib.sha256(inspect.getsource(run_lm_eval).encode()).hexdigest()

