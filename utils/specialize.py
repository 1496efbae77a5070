"""Making a specialist with LoRA: instruction datasets from the offline corpora, a small training loop,
and the scorers of two tasks.

Both tasks read SMS messages (`utils.data.load_labeled("sms", split)`), so the corpus splits keep
training ("train"), validation ("validation") and test ("eval") messages apart:

- "classify": the model reads a message and answers with one word of a fixed vocabulary, `ANSWERS`
  ("ham" or "spam"). Scored by comparing the log-probability of each answer word after the prompt
  (`answer_logprobs`), never by free generation, so every prediction is one of the answers.
- "extract": the model answers with a JSON object whose values are computed from the message by code
  (`sms_fields`): the label, whether the message contains a digit, whether it contains a web address,
  and its first word. Scored on greedy generations by `check_extraction`: valid JSON, the right keys,
  the right values.

Prompts are chat-formatted with the tokenizer's chat template; every answer ends with the end-of-turn
token so the model learns to stop. Batches are left-padded: all answers then end in the last column,
and the loss needs logits only for the last few positions (`logits_to_keep`), which skips most of the
LM head, the largest single matrix of a small model. Position ids count real tokens only, as
`generate` does with left padding, so training, scoring and generation see the same positions.

LoRA itself comes from peft (Hu et al., 2021; DoRA: Liu et al., 2024). `lora_config` only turns a named
group of modules ("attention", "mlp", "all-linear") into peft's `target_modules` after checking that
they exist in the model; `finetune` trains whatever parameters require gradients with the course's one
training loop, `utils.training.train` (the loop `utils.distill.distill` uses too), and returns its
`TrainingHistory`. Trained on answers alone, an adapter also changes how the model reads any
text; `finetune(..., anchor_weight=...)` adds a KL anchor to the same model with its adapter disabled
(see `answer_loss`), which keeps general perplexity in place.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checks import check_int, check_module, check_number, check_optional_int, check_positive_int, check_str, check_tensor
from .batches import Batch, batch_key, check_batches, pad_rows, pad_token_id
from .data import bos_ids, load_labeled
from .distill import check_head_once, kd_loss, logits_from_final_state, next_token_loss
from .evaluation import model_fingerprint, perplexity, run_lm_eval
from .models import cache_argument_name, compute_autocast, decoder_layers, model_device, output_cache
from .training import EvalFn, TrainingHistory, autocast_dtype, check_training_arguments, train

SMS_TASKS = ("classify", "extract")
ANSWERS = ("ham", "spam")
EXTRACT_KEYS = ("label", "has_number", "has_url", "first_word")
SYSTEM_PROMPT = "You read SMS messages."
INSTRUCTIONS = {
    "classify": "Is this SMS spam or ham (a normal message)? Answer spam or ham.\nMessage: {text}",
    "extract": "Answer with JSON: label (spam or ham), has_number, has_url (a web address), first_word "
               "(lowercase).\nMessage: {text}",
}
URL_PATTERN = re.compile(r"https?://|www\.|\b[\w-]+\.(?:com|net|org|biz|info|co\.uk)\b", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------------
# Instruction datasets
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    """One instruction example: the message as shown, its label, the user's prompt and the right answer."""

    task: str
    text: str
    label: str
    prompt: str
    answer: str


def sms_fields(text: str, label: str) -> dict[str, object]:
    """The JSON object the "extract" task asks for, computed from the message by code (keys `EXTRACT_KEYS`).

    has_number: the message contains a digit; has_url: it contains a web address (http(s)://, www. or a
    domain such as example.com); first_word: its first run of letters, lowercased ("" if none).
    """
    if label not in ANSWERS:
        raise ValueError(f"Label {label!r} is outside the answer vocabulary {ANSWERS}.")
    first_word = re.search(r"[A-Za-z]+", text)
    return {"label": label, "has_number": bool(re.search(r"\d", text)), "has_url": bool(URL_PATTERN.search(text)),
            "first_word": first_word.group(0).lower() if first_word else ""}


def shorten(text: str, max_chars: int) -> str:
    """The message cut to at most `max_chars` characters at a word boundary (whitespace normalized)."""
    max_chars = check_int("max_chars", max_chars, minimum=1)
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars].rsplit(" ", 1)[0]
    return cut if cut else text[:max_chars]


def make_examples(messages: Sequence[tuple[str, str]], task: str, max_chars: int = 300) -> list[Example]:
    """Instruction examples of `task` ("classify" or "extract") from (text, label) pairs, in their order.

    Each message is shortened to `max_chars` characters (`shorten`) and the extraction fields are
    computed from the shortened text, the text the model sees. Raises a ValueError for an unknown task,
    no messages, or a label outside `ANSWERS`.
    """
    if task not in SMS_TASKS:
        raise ValueError(f"Unknown task {task!r}; the tasks are {SMS_TASKS}.")
    messages = list(messages)
    if not messages:
        raise ValueError("No messages: the split is empty, so there is nothing to build examples from.")
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}.")
    outside = sorted({str(label) for _, label in messages if label not in ANSWERS})
    if outside:
        raise ValueError(f"Labels {outside} are outside the answer vocabulary {ANSWERS}.")
    examples = []
    for text, label in messages:
        shown = shorten(text, max_chars)
        answer = label if task == "classify" else json.dumps(sms_fields(shown, label))
        examples.append(Example(task, shown, label, INSTRUCTIONS[task].format(text=shown), answer))
    return examples


def sms_examples(split: str, task: str, n_per_class: int | None = None, seed: int = 0,
                 max_chars: int = 300, exclude: Sequence[str] = ()) -> list[Example]:
    """A balanced, shuffled set of `task` examples from one split of the SMS corpus.

    `n_per_class` messages of each label are drawn at random (seeded); None takes as many as the
    rarer label has (spam is about 13% of the messages). Use "train" for training, "validation" for
    validation during training and "eval" as the held-out test split. Raises a ValueError when the
    split holds fewer messages of a label than asked for.

    The corpus holds near-duplicates (spam templates sent with small changes), and the splits are made
    from the full texts, so two messages of different splits can read the same once shortened. Pass the
    shown texts of the held-out examples as `exclude` (for example `[e.text for e in test]`) to leave
    such messages out before drawing.
    """
    if n_per_class is not None and n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1 or None (as many as the rarer label has), got {n_per_class}.")
    excluded = set(exclude)
    messages = [(text, label) for text, label in load_labeled("sms", split)
                if shorten(text, max_chars) not in excluded]
    by_label = {label: [m for m in messages if m[1] == label] for label in ANSWERS}
    available = min(len(pool) for pool in by_label.values())
    n = available if n_per_class is None else n_per_class
    if n > available or n == 0:
        raise ValueError(f"The {split!r} split of 'sms' holds {', '.join(f'{len(p)} {l}' for l, p in by_label.items())} "
                         f"messages; asked for {n} of each label.")
    rng = random.Random(seed)
    chosen = [m for label in ANSWERS for m in rng.sample(by_label[label], n)]
    rng.shuffle(chosen)
    return make_examples(chosen, task, max_chars)


# ---------------------------------------------------------------------------------------------------
# Tokens and batches
# ---------------------------------------------------------------------------------------------------

def prompt_token_ids(tokenizer, prompt: str, system: str | None = SYSTEM_PROMPT) -> list[int]:
    """Token ids of `prompt` as a user turn in the tokenizer's chat template, after a short system turn,
    ending with the assistant's generation prompt (the answer comes next).

    The short `SYSTEM_PROMPT` replaces the longer default that some templates (SmolLM2's) insert, which
    would make every example about 15 tokens longer; None leaves the template's default.
    """
    check_str("prompt", prompt, empty=True)
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_token_ids(tokenizer, answer: str, end_of_turn: bool = True) -> list[int]:
    """Token ids of an answer, followed by the end-of-turn token (the tokenizer's eos) when asked."""
    check_str("answer", answer, empty=True)
    if end_of_turn and tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos token to end the answer with; pass end_of_turn=False.")
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"The answer {answer!r} has no tokens.")
    return ids + ([tokenizer.eos_token_id] if end_of_turn else [])


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only (0 for the first real token of each row), as `generate` uses."""
    check_tensor("attention_mask", attention_mask, dim=2)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def training_batches(tokenizer, examples: Sequence[Example], batch_size: int = 8, seed: int = 0,
                     group_by_length: bool = True) -> list[dict[str, torch.Tensor]]:
    """Left-padded training batches: input_ids, attention_mask and labels (-100 except on answer tokens).

    Each row is the chat-formatted prompt followed by the answer and the end-of-turn token; only the
    answer tokens are learned. With `group_by_length` rows of similar length share a batch (little
    padding, so less compute wasted) and the batches come in a seeded random order; otherwise the
    examples are batched in their order. Raises a ValueError when there are no examples.
    """
    examples = list(examples)
    if not examples:
        raise ValueError("No training examples: the training split is empty (see sms_examples).")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    pad_id = pad_token_id(tokenizer)
    rows = [(prompt_token_ids(tokenizer, e.prompt), answer_token_ids(tokenizer, e.answer)) for e in examples]
    if group_by_length:
        rows.sort(key=lambda row: len(row[0]) + len(row[1]))
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        input_ids, attention_mask = pad_rows([prompt + answer for prompt, answer in chunk], pad_id, side="left")
        labels = torch.full_like(input_ids, -100)
        for i, (_, answer) in enumerate(chunk):
            labels[i, -len(answer):] = torch.tensor(answer)
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    if group_by_length:
        random.Random(seed).shuffle(batches)
    return batches


def answer_loss(model: nn.Module, batch: Batch, anchor_weight: float = 0.0, anchor_tokens: int = 32,
                reference_cache: dict | None = None) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of a left-padded batch (from `training_batches`), plus,
    with `anchor_weight` > 0, that weight times a KL anchor to the model without its adapter.

    The answers end in the last column, so the model is asked for logits of the last (longest answer + 1)
    positions only (`logits_to_keep`); `utils.distill.next_token_loss` scores them. The anchor is
    `utils.distill.kd_loss` (temperature 1) between the model with its peft adapter disabled and with it,
    over the `anchor_tokens` prompt positions just before the answer (the end of the message and the
    template): the adapter is free to change the answers but pays for changing how the model reads
    ordinary text. It needs a peft model and one more forward pass (without gradients) per batch; a few
    positions keep its cost low, since every position anchored needs logits over the whole vocabulary.
    With `reference_cache` (a dict the caller keeps; `finetune` checks what fills it) that pass runs once
    per batch: its final hidden state is kept, and a later call on the same batch computes the reference
    logits from it with the output embedding alone (`utils.distill.logits_from_final_state`).
    """
    check_module("model", model)
    anchor_weight = check_number("anchor_weight", anchor_weight, minimum=0.0)
    anchor_tokens = check_int("anchor_tokens", anchor_tokens, minimum=1)
    check_batches([batch], "batch")
    if "labels" not in batch:
        raise ValueError("batch needs 'labels' (-100 except on answer tokens); see training_batches.")
    device = model_device(model)
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    keep = int((labels != -100).sum(1).max()) + 1
    if keep < 2:
        raise ValueError("The batch has no answer tokens to learn (every label is -100).")
    if anchor_weight > 0 and not hasattr(model, "disable_adapter"):
        raise ValueError("anchor_weight > 0 needs a peft model: the anchor compares it with its adapter disabled.")
    if anchor_weight > 0:
        keep = min(keep + anchor_tokens, input_ids.shape[1])
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids_from_mask(attention_mask), use_cache=False, logits_to_keep=keep)
    logits = model(**inputs).logits
    mask, labels = attention_mask[:, -keep:], labels[:, -keep:]
    loss = next_token_loss(logits, labels, mask)
    if anchor_weight > 0:
        reference = anchor_reference(model, batch, inputs, keep, reference_cache)
        predicts_prompt = torch.zeros_like(mask, dtype=torch.bool)  # position t predicts token t+1
        predicts_prompt[:, :-1] = mask[:, :-1].bool() & mask[:, 1:].bool() & (labels[:, 1:] == -100)
        loss = loss + anchor_weight * kd_loss(logits, reference, predicts_prompt, temperature=1.0)
    return loss


def anchor_reference(model: nn.Module, batch: Batch, inputs: Mapping[str, torch.Tensor], keep: int,
                     reference_cache: dict | None = None) -> torch.Tensor:
    """The logits of `model` with its peft adapter disabled on the last `keep` positions of `inputs` (the
    anchor's reference in `answer_loss`), without gradients.

    With `reference_cache`, the first call on a batch (keyed by its content, labels included, and `keep`)
    stores the final hidden state of those positions, after checking once that the output embedding of it
    reproduces the logits exactly; later calls return the output embedding of the stored state, the same
    logits without running the blocks.
    """
    check_module("model", model)
    if not hasattr(model, "disable_adapter"):
        raise ValueError("model must be a peft model: the anchor's reference is the model with its adapter disabled.")
    check_int("keep", keep, minimum=1)
    if reference_cache is not None and not isinstance(reference_cache, dict):
        raise TypeError(f"reference_cache must be a dict (start with {{}}) or None, got {type(reference_cache).__name__}.")
    with torch.no_grad(), model.disable_adapter():
        if reference_cache is None:
            return model(**inputs).logits
        key = (batch_key(batch, with_labels=True), keep)
        stored = reference_cache.get(key)
        if stored is not None:
            return logits_from_final_state(model, stored)
        out = model(**inputs, output_hidden_states=True)
        final = out.hidden_states[-1][:, -keep:]
        check_head_once(model, final, out.logits, reference_cache, "reference_cache")
        reference_cache[key] = final
        return out.logits


# ---------------------------------------------------------------------------------------------------
# LoRA configuration (peft) and training
# ---------------------------------------------------------------------------------------------------

TARGET_GROUPS = ("attention", "mlp", "all-linear")


def linear_module_names(model: nn.Module) -> dict[str, list[str]]:
    """Names of the Linear modules inside a decoder block, grouped as "attention" and "mlp".

    These are the names peft's `target_modules` matches (the last part of a module's path, such as
    "q_proj" or "down_proj"), collected over all blocks (block 0's attention may be bypassed); the LM head
    lies outside the blocks and is never a target here.
    """
    groups: dict[str, list[str]] = {"attention": [], "mlp": []}
    for block in decoder_layers(model):  # every block: a bypassed one has no attention projections at all
        for path, module in block.named_modules():
            if isinstance(module, nn.Linear):
                group = "attention" if "attn" in path or "attention" in path else "mlp"
                name = path.rsplit(".", 1)[-1]
                if name not in groups[group]:
                    groups[group].append(name)
    return groups


def lora_config(model: nn.Module, targets: str | Sequence[str] = "all-linear", rank: int = 8,
                alpha: float | None = None, dropout: float = 0.0, dora: bool = False):
    """A peft LoraConfig for a causal LM whose target modules are checked against `model`.

    `targets` is a group, "attention" (q, k, v, o projections), "mlp" (gate, up, down) or "all-linear"
    (both), or a list of module names such as ["q_proj", "v_proj"]. `alpha` defaults to 2 * rank (the
    update is scaled by alpha / rank). `dora=True` asks peft for DoRA, which also learns the magnitude of
    each weight's columns. Raises a ValueError for an unknown group, a module name that does not exist
    in the model (listing those that do), or a rank below 1.
    """
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}.")
    available = linear_module_names(model)
    every = available["attention"] + available["mlp"]
    if isinstance(targets, str):
        if targets not in TARGET_GROUPS:
            raise ValueError(f"Unknown target group {targets!r}: use one of {TARGET_GROUPS} or a list of module "
                             f"names from {every}.")
        modules = every if targets == "all-linear" else available[targets]
    else:
        modules = list(targets)
        missing = [name for name in modules if name not in every]
        if missing or not modules:
            raise ValueError(f"Target modules {missing or modules} do not exist in this model; its decoder blocks' "
                             f"linear modules are {every}.")
    return LoraConfig(r=rank, lora_alpha=2 * rank if alpha is None else alpha, lora_dropout=dropout,
                      target_modules=list(modules), use_dora=dora, bias="none", task_type="CAUSAL_LM")


def adapter_size_bytes(peft_model: nn.Module, folder: str | Path) -> int:
    """Save the adapter with peft's `save_pretrained` into `folder` and return the bytes of its files.

    `folder` is created if it does not exist; a folder that cannot be created is refused (naming `folder`)
    before anything is saved, and so is a model without a peft adapter (it would save all its weights).
    """
    if isinstance(folder, bool) or not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a folder path (str or Path), got {type(folder).__name__}.")
    check_module("peft_model", peft_model)
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise type(error)(error.errno, f"folder {str(folder)!r} cannot be created ({error.strerror}); pass a "
                                       "folder in a writable place") from error
    if not hasattr(peft_model, "peft_config"):
        raise ValueError("peft_model has no peft adapter (wrap the model with peft.get_peft_model): saving it "
                         "would write all its weights, not an adapter.")
    peft_model.save_pretrained(folder)
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def finetune(model: nn.Module, train_batches: Sequence[Batch], *, steps: int, lr: float = 5e-4,
             grad_accum: int = 1, warmup_steps: int = 0, weight_decay: float = 0.0,
             max_grad_norm: float | None = 1.0, eval_fn: EvalFn | None = None, eval_every: int | None = None,
             anchor_weight: float = 0.0, anchor_tokens: int = 32, shuffle: bool = True, seed: int = 0,
             mixed_precision: str = "auto", progress: bool = True, desc: str = "finetune",
             reference_cache: dict | None = None) -> TrainingHistory:
    """Train the parameters of `model` that require gradients on the answer loss; return the history.

    Meant for a peft model (only the adapter trains), it works on any model. The training loop is
    `utils.training.train`: each of the `steps` optimizer steps accumulates `grad_accum` batches of
    `train_batches` (from `training_batches`), cycled as needed and re-ordered on every pass with
    `shuffle`; AdamW with linear warm-up then cosine decay to 0, gradients clipped to `max_grad_norm`,
    float32 master weights with autocast on a float16 or bfloat16 model (`mixed_precision`); on a CPU a LoRA
    model trains in float32 even where bfloat16 autocast is available (`utils.models.cpu_autocast_dtype`). The loss is
    `answer_loss`, with its KL anchor to the model without adapter over `anchor_tokens` prompt positions
    when `anchor_weight` > 0. `eval_fn(model)` (a float or a dict of floats, for example a validation
    accuracy) runs before training, every `eval_every` steps and at the end, in eval mode without
    gradients. Train rows of the history hold step, loss, lr, grad_norm, answer tokens seen, train_s
    (seconds spent in training steps, evaluations excluded) and elapsed_s. The model is left in eval mode.

    `reference_cache`: a dict (empty at first) that keeps the anchor's reference per batch
    (`anchor_reference`), so that several adapters trained on the same frozen model and batches (a
    comparison of configurations, a longer run beside a shorter one) run the model without adapter once
    per batch. The training is the same as without it. A dict filled from another frozen model (weights,
    device, precision) or another `anchor_tokens` is refused; it costs one final hidden state per batch.
    With `anchor_weight` 0 there is no reference, and the dict is left untouched.
    """
    check_training_arguments(steps, lr, grad_accum, warmup_steps, eval_every, max_grad_norm, weight_decay)
    check_number("anchor_weight", anchor_weight, minimum=0.0)
    check_int("anchor_tokens", anchor_tokens, minimum=1)
    if reference_cache is not None and not isinstance(reference_cache, dict):
        raise TypeError(f"reference_cache must be a dict (start with {{}}) or None, got {type(reference_cache).__name__}.")
    if anchor_weight == 0:
        reference_cache = None  # no anchor, no reference to keep
    if reference_cache is not None:
        # one cache, one frozen model computed one way: its weights without the adapter, device and precision
        identity = (model_fingerprint(model, include_trainable=False), str(model_device(model)),
                    str(autocast_dtype(model, mixed_precision)), anchor_tokens)
        if reference_cache.setdefault("reference", identity) != identity:
            raise ValueError("reference_cache holds references computed another way (another frozen model, device "
                             "or precision, or another anchor_tokens): pass a new dict.")
    train_batches = check_batches(train_batches, "train_batches", min_real_tokens=2)
    if any("labels" not in batch for batch in train_batches):
        raise ValueError("Every training batch needs 'labels' (-100 except on answer tokens); see training_batches.")

    def loss_fn(trained: nn.Module, batch: Batch) -> torch.Tensor:
        return answer_loss(trained, batch, anchor_weight, anchor_tokens, reference_cache)

    return train(model, train_batches, loss_fn, steps=steps, lr=lr, grad_accum=grad_accum, warmup_steps=warmup_steps,
                 weight_decay=weight_decay, max_grad_norm=max_grad_norm, eval_fn=eval_fn, eval_every=eval_every,
                 shuffle=shuffle, seed=seed, count_tokens=lambda batch: int((batch["labels"] != -100).sum()),
                 mixed_precision=mixed_precision, progress=progress, desc=desc, batches_name="train_batches")


# ---------------------------------------------------------------------------------------------------
# Scoring: classification by answer log-probabilities, extraction by a checker
# ---------------------------------------------------------------------------------------------------

def _batches_by_length(rows: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices of `rows` in batches of at most `batch_size`, shortest rows first, so that rows of similar
    length share a batch and left padding wastes little compute."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def _prompts_of(examples_or_prompts: Sequence[Example | str], name: str) -> list[str]:
    """The prompts of a non-empty list of examples or prompt strings (a single string is refused)."""
    if isinstance(examples_or_prompts, (str, bytes, Example, Mapping)) or not isinstance(examples_or_prompts, Iterable):
        raise TypeError(f"{name} must be a list of Examples or prompt strings, got {type(examples_or_prompts).__name__}.")
    prompts = [e.prompt if isinstance(e, Example) else str(e) for e in examples_or_prompts]
    if not prompts:
        raise ValueError(f"{name} must hold at least one Example or prompt string; got none.")
    return prompts


@torch.no_grad()
def answer_logprobs(model: nn.Module, tokenizer, prompts: Sequence[Example | str],
                    answers: Sequence[str] = ANSWERS, batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """Log-probability of each answer after each chat-formatted prompt: Tensor[n_prompts, n_answers].

    An answer's log-probability is the sum over its tokens (the end-of-turn token not included). One
    forward pass reads the prompts (left-padded, logits for the last position only); an answer of
    several tokens continues from a copy of the prompts' KV cache, so the prompt is never run twice.
    Prompts of similar length share a batch (less padding to compute); rows come back in input order.
    The passes run under `utils.models.compute_autocast`, like `utils.evaluation.batch_nll`.
    """
    check_module("model", model)
    prompts = _prompts_of(prompts, "prompts")
    if isinstance(answers, (str, bytes, Mapping)) or not isinstance(answers, Iterable):
        raise TypeError(f"answers must be a list of answer strings such as {list(ANSWERS)}, got {type(answers).__name__}.")
    answers = [check_str(f"answers[{i}]", answer) for i, answer in enumerate(answers)]
    if not answers:
        raise ValueError(f"answers must hold at least one answer, such as {list(ANSWERS)}; got none.")
    batch_size = check_positive_int("batch_size", batch_size)
    device = model_device(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cache_name = cache_argument_name(base)
    answer_ids = [answer_token_ids(tokenizer, answer, end_of_turn=False) for answer in answers]
    pad_id = pad_token_id(tokenizer)
    prompt_rows = [prompt_token_ids(tokenizer, p) for p in prompts]
    scores = torch.empty(len(prompts), len(answers))
    # bfloat16 matrix products on a CPU with bfloat16 units (utils.models.compute_autocast)
    with compute_autocast(model):
        for batch in tqdm(_batches_by_length(prompt_rows, batch_size), desc="scoring answers", disable=not progress,
                          leave=False):
            rows = [prompt_rows[i] for i in batch]
            input_ids, attention_mask = pad_rows(rows, pad_id, side="left")
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            position_ids = position_ids_from_mask(attention_mask)
            output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                           logits_to_keep=1)
            first = F.log_softmax(output.logits[:, -1].float(), dim=-1)
            batch_scores = torch.empty(len(rows), len(answers))
            for k, ids in enumerate(answer_ids):
                score = first[:, ids[0]]
                if len(ids) > 1:
                    rest = torch.tensor(ids, device=device).expand(len(rows), -1)
                    mask = torch.cat([attention_mask, torch.ones_like(rest[:, 1:])], dim=1)
                    continued = model(input_ids=rest[:, :-1], attention_mask=mask,
                                      position_ids=position_ids[:, -1:] + 1 + torch.arange(len(ids) - 1, device=device),
                                      use_cache=True, **{cache_name: copy.deepcopy(output_cache(output))})
                    logprobs = F.log_softmax(continued.logits.float(), dim=-1)
                    score = score + logprobs.gather(-1, rest[:, 1:, None]).squeeze(-1).sum(-1)
                batch_scores[:, k] = score.cpu()
            scores[batch] = batch_scores
    return scores


def classify(model: nn.Module, tokenizer, examples: Sequence[Example | str], answers: Sequence[str] = ANSWERS,
             batch_size: int = 16, progress: bool = False) -> list[str]:
    """The answer with the highest log-probability for each prompt (see `answer_logprobs`)."""
    batch_size = check_positive_int("batch_size", batch_size)
    prompts = _prompts_of(examples, "examples")
    scores = answer_logprobs(model, tokenizer, prompts, answers, batch_size, progress)
    return [answers[i] for i in scores.argmax(-1).tolist()]


def classification_scores(predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    """Accuracy, the recall of each label, and the share of predictions that say "spam"."""
    if len(predictions) != len(examples) or not examples:
        raise ValueError(f"Need one prediction per example and at least one example; got {len(predictions)} "
                         f"predictions for {len(examples)} examples.")
    scores = {"accuracy": sum(p == e.label for p, e in zip(predictions, examples)) / len(examples)}
    for label in ANSWERS:
        rows = [p for p, e in zip(predictions, examples) if e.label == label]
        scores[f"{label}_recall"] = sum(p == label for p in rows) / len(rows) if rows else float("nan")
    scores["answered_spam"] = sum(p == "spam" for p in predictions) / len(predictions)
    return scores


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer, prompts: Sequence[Example | str], max_new_tokens: int = 40,
                     batch_size: int = 16, progress: bool = False) -> list[str]:
    """Greedy answers to chat-formatted prompts, generated in left-padded batches, decoded and stripped.

    Prompts of similar length share a batch (less padding to compute); answers come back in input order.
    """
    check_module("model", model)
    prompts = _prompts_of(prompts, "prompts")
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, minimum=1)
    batch_size = check_positive_int("batch_size", batch_size)
    device = model_device(model)
    pad_id = pad_token_id(tokenizer)
    prompt_rows = [prompt_token_ids(tokenizer, p) for p in prompts]
    outputs = [""] * len(prompts)
    for batch in tqdm(_batches_by_length(prompt_rows, batch_size), desc="generating", disable=not progress, leave=False):
        input_ids, attention_mask = pad_rows([prompt_rows[i] for i in batch], pad_id, side="left")
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                   max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                                   eos_token_id=tokenizer.eos_token_id)
        new_tokens = generated[:, input_ids.shape[1]:]
        for i, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            outputs[i] = text.strip()
    return outputs


def check_extraction(output: str, expected: Mapping[str, object]) -> dict[str, bool]:
    """Check one generated answer against the expected JSON object.

    valid_json: the whole answer parses as a JSON object; right_keys: it has exactly the expected keys;
    one entry per expected key: that value is right (same type and value); passed: all of these.
    """
    check_str("output", output, empty=True)  # an empty answer is a wrong answer, not a wrong argument
    if not isinstance(expected, Mapping):
        raise TypeError(f"expected must be a dict of the expected JSON fields (see sms_fields), got {type(expected).__name__}.")
    try:
        parsed = json.loads(output)
    except ValueError:
        parsed = None
    valid = isinstance(parsed, dict)
    result = {"valid_json": valid, "right_keys": valid and set(parsed) == set(expected)}
    for key, value in expected.items():
        got = parsed.get(key) if valid else None
        result[key] = valid and key in parsed and type(got) is type(value) and got == value
    result["passed"] = all(result.values())
    return result


def extraction_scores(outputs: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    """Share of answers passing each check of `check_extraction`, and "passed": the share passing all."""
    if len(outputs) != len(examples) or not examples:
        raise ValueError(f"Need one output per example and at least one example; got {len(outputs)} outputs "
                         f"for {len(examples)} examples.")
    checks = [check_extraction(output, json.loads(example.answer)) for output, example in zip(outputs, examples)]
    return {key: sum(check[key] for check in checks) / len(checks) for key in checks[0]}


def specialist_report(model: nn.Module, tokenizer, classify_examples: Sequence[Example],
                      extract_examples: Sequence[Example], wiki_ids: torch.Tensor, window: int = 512,
                      lm_eval_limit: int | None = None,
                      max_new_tokens: int = 40) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Everything a chapter reports about one model, and the model's answers.

    The task scores on held-out examples (`classification_scores` and the share of JSON answers that
    pass `check_extraction`, as "json passed") and the general ability: perplexity of `wiki_ids`
    ("wiki ppl", `utils.evaluation.perplexity`) and the accuracy of each offline lm-eval task
    (`utils.evaluation.run_lm_eval`, `lm_eval_limit` documents per task). The answers come back as
    {"classify": one answer word per classification example, "extract": one generated text per
    extraction example}, so a chapter can compare two models answer by answer without scoring again.
    The perplexity windows begin the way the tokenizer begins a text (`utils.data.bos_ids`: a BOS for
    Llama 3 and Gemma, nothing for SmolLM2); the prompts are chat-formatted, and the chat template writes
    its own BOS where the model needs one.
    """
    check_module("model", model)
    window = check_int("window", window, minimum=2)
    lm_eval_limit = check_optional_int("lm_eval_limit", lm_eval_limit, minimum=1)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, minimum=1)
    bos = bos_ids(tokenizer)
    bos_token_id = bos[-1] if bos else None
    if bos_token_id is not None and window < 3:
        raise ValueError(f"window must be at least 3 with this tokenizer's BOS (one place of each window), got {window}.")
    predictions = classify(model, tokenizer, classify_examples)
    outputs = generate_answers(model, tokenizer, extract_examples, max_new_tokens=max_new_tokens)
    row = {**classification_scores(predictions, classify_examples),
           "json passed": extraction_scores(outputs, extract_examples)["passed"],
           "wiki ppl": perplexity(model, wiki_ids, window=window, progress=False, bos_token_id=bos_token_id)}
    tasks = run_lm_eval(model, tokenizer, limit=lm_eval_limit).set_index("task")["value"]
    row.update({task: float(value) for task, value in tasks.items()})
    return row, {"classify": predictions, "extract": outputs}
