import copy
import json

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from utils.data import load_labeled
from utils.evaluation import model_fingerprint
from utils.models import tiny_model
from utils.specialize import (ANSWERS, EXTRACT_KEYS, Example, adapter_size_bytes, answer_logprobs, answer_loss,
                              answer_token_ids, check_extraction, classification_scores, classify,
                              extraction_scores, finetune, generate_answers, linear_module_names, lora_config,
                              make_examples, prompt_token_ids, shorten, sms_examples, sms_fields,
                              specialist_report, training_batches)

MESSAGES = [("Ok lor, see you at 8", "ham"), ("WIN a prize! Call 09061701461 or visit www.win-now.com", "spam"),
            ("Sorry, I'll call later", "ham"), ("URGENT! Your mobile won £2000, txt CLAIM to 81010", "spam")]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def llama():
    return tiny_model("tiny-llama", seed=0)


def _examples(task="classify"):
    return make_examples(MESSAGES, task)


def _unpadded_answer_logprob(model, tokenizer, prompt, answer):
    """Reference: log p(answer | prompt) from one unpadded row, token by token."""
    prompt_ids = prompt_token_ids(tokenizer, prompt)
    answer_ids = answer_token_ids(tokenizer, answer, end_of_turn=False)
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), dim=-1)
    return sum(logprobs[len(prompt_ids) - 1 + i, token].item() for i, token in enumerate(answer_ids))


def test_fields_are_computed_from_the_text():
    assert sms_fields("WIN a prize! Call 0906 or visit www.win-now.com", "spam") == {
        "label": "spam", "has_number": True, "has_url": True, "first_word": "win"}
    assert sms_fields("  ...ok lor. see you", "ham") == {"label": "ham", "has_number": False, "has_url": False,
                                                         "first_word": "ok"}
    assert sms_fields("go to example.co.uk now", "ham")["has_url"]
    assert not sms_fields("i.e. later", "ham")["has_url"]
    with pytest.raises(ValueError, match="answer vocabulary"):
        sms_fields("hello", "maybe")


def test_examples_shorten_the_text_and_answer_from_what_is_shown():
    text = "Call me " + "please " * 60 + "at 0800 123"
    example = make_examples([(text, "ham")], "extract", max_chars=40)[0]
    assert len(example.text) <= 40 and example.text in example.prompt
    assert json.loads(example.answer) == sms_fields(example.text, "ham")
    assert json.loads(example.answer)["has_number"] is False  # the digits were cut away
    assert list(json.loads(example.answer)) == list(EXTRACT_KEYS)
    assert shorten("a  b\n c", 100) == "a b c"
    assert [e.answer for e in _examples()] == [label for _, label in MESSAGES]


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="split is empty"):
        make_examples([], "classify")
    with pytest.raises(ValueError, match="outside the answer vocabulary"):
        make_examples([("hello", "ham"), ("buy now", "junk")], "classify")
    with pytest.raises(ValueError, match="Unknown task"):
        make_examples(MESSAGES, "translate")
    with pytest.raises(ValueError, match="asked for 100000"):
        sms_examples("validation", "classify", n_per_class=100000)
    with pytest.raises(ValueError, match="training split is empty"):
        training_batches(tiny_model("tiny-llama")[1], [])


def test_sms_examples_are_balanced_seeded_and_from_their_split():
    train = sms_examples("train", "classify", n_per_class=20, seed=0)
    assert sorted(e.label for e in train) == ["ham"] * 20 + ["spam"] * 20
    assert [e.text for e in train] == [e.text for e in sms_examples("train", "classify", n_per_class=20, seed=0)]
    assert [e.text for e in train] != [e.text for e in sms_examples("train", "classify", n_per_class=20, seed=1)]
    test_texts = {" ".join(text.split()) for text, _ in load_labeled("sms", "eval")}
    assert not {e.text for e in train} & test_texts
    everything = sms_examples("validation", "extract")  # None: as many as the rarer label has
    assert sum(e.label == "spam" for e in everything) == sum(e.label == "ham" for e in everything) > 10


def test_training_batches_learn_only_the_answer_and_end_together(llama):
    _, tokenizer = llama
    examples = _examples("classify") + _examples("extract")
    batches = training_batches(tokenizer, examples, batch_size=3, seed=0)
    assert sum(len(b["input_ids"]) for b in batches) == len(examples)
    answers = set()
    for batch in batches:
        assert batch["attention_mask"][:, -1].all()  # left padding: every row ends in the last column
        assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
        for row, labels in zip(batch["input_ids"], batch["labels"]):
            learned = labels[labels != -100]
            assert learned[-1] == tokenizer.eos_token_id
            assert torch.equal(row[-len(learned):], learned)
            answers.add(tokenizer.decode(learned[:-1]))
    assert answers == {e.answer for e in examples}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "tiny-qwen3"])
def test_answer_logprobs_match_unpadded_scoring(name):
    model, tokenizer = tiny_model(name, seed=1)
    examples = _examples()
    scores = answer_logprobs(model, tokenizer, examples, answers=("ham", "spam", "x"), batch_size=3)
    assert scores.shape == (len(examples), 3)
    for i, example in enumerate(examples):
        for k, answer in enumerate(("ham", "spam", "x")):
            reference = _unpadded_answer_logprob(model, tokenizer, example.prompt, answer)
            assert scores[i, k].item() == pytest.approx(reference, abs=1e-3)
    assert classify(model, tokenizer, examples) == [ANSWERS[i] for i in scores[:, :2].argmax(-1).tolist()]


def test_answer_loss_of_a_padded_batch_equals_unpadded_token_average(llama):
    model, tokenizer = llama
    examples = _examples("extract")[:2] + _examples("classify")[:1]
    batch = training_batches(tokenizer, examples, batch_size=3, group_by_length=False)[0]
    losses = []
    for example in examples:
        prompt, answer = prompt_token_ids(tokenizer, example.prompt), answer_token_ids(tokenizer, example.answer)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + answer]), use_cache=False).logits[0]
        losses.append(F.cross_entropy(logits[len(prompt) - 1:-1], torch.tensor(answer), reduction="none"))
    with torch.no_grad():
        loss = answer_loss(model, batch)
    assert loss.item() == pytest.approx(torch.cat(losses).mean().item(), rel=1e-4)


def test_lora_config_targets_exist_and_bad_names_are_refused(tiny):
    name, model, _ = tiny
    groups = linear_module_names(model)
    assert set(groups["attention"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}, name
    assert set(groups["mlp"]) == {"gate_proj", "up_proj", "down_proj"}, name
    assert sorted(lora_config(model, "attention", rank=4).target_modules) == sorted(groups["attention"])
    assert sorted(lora_config(model, ["q_proj", "v_proj"]).target_modules) == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="q_projj.*do not exist"):
        lora_config(model, ["q_projj"])
    with pytest.raises(ValueError, match="Unknown target group"):
        lora_config(model, "embeddings")
    with pytest.raises(ValueError, match="rank"):
        lora_config(model, "mlp", rank=0)


def test_lora_parameter_counts_follow_rank_and_targets():
    model, _ = tiny_model("tiny-llama")
    counts = {}
    for targets, rank in (("attention", 4), ("attention", 8), ("mlp", 4), ("all-linear", 4)):
        peft_model = get_peft_model(tiny_model("tiny-llama")[0], lora_config(model, targets, rank=rank))
        trainable, _ = peft_model.get_nb_trainable_parameters()
        assert all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
        counts[targets, rank] = trainable
    assert counts["attention", 8] == 2 * counts["attention", 4]
    assert counts["all-linear", 4] == counts["attention", 4] + counts["mlp", 4]


def _right_answer_logprob(model, tokenizer, examples):
    scores = answer_logprobs(model, tokenizer, examples)
    return sum(scores[i, ANSWERS.index(e.label)].item() for i, e in enumerate(examples)) / len(examples)


def test_finetune_learns_the_answers_and_changes_only_the_adapter(tmp_path):
    model, tokenizer = tiny_model("tiny-llama", seed=0)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_peft_model(model, lora_config(model, "all-linear", rank=4))
    examples = _examples()
    before = _right_answer_logprob(peft_model, tokenizer, examples)
    batches = training_batches(tokenizer, examples, batch_size=2)
    calls = []

    def accuracy(m):
        calls.append(m.training)
        return {"accuracy": classification_scores(classify(m, tokenizer, examples), examples)["accuracy"]}

    history = finetune(peft_model, batches, steps=30, lr=1e-2, eval_fn=accuracy, eval_every=10, progress=False)
    losses = history.column("loss")
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < losses[0] - 0.5
    assert _right_answer_logprob(peft_model, tokenizer, examples) > before + 1.0
    assert history.column("step", "eval") == [0, 10, 20, 30] and calls == [False] * 4
    assert len(history.column("accuracy", "eval")) == 4
    assert history.train[-1]["train_s"] <= history.train[-1]["elapsed_s"]
    assert not peft_model.training
    for name, parameter in peft_model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(parameter, base_weights[name.replace(".base_layer", "")]), name
    size = adapter_size_bytes(peft_model, tmp_path / "adapter")
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert 4 * trainable <= size < 4 * trainable + 100_000


def test_anchor_keeps_the_prompt_predictions_of_the_model_without_adapter(llama):
    _, tokenizer = llama
    examples = _examples()
    batch = training_batches(tokenizer, examples, batch_size=4)[0]
    prompt_positions = (batch["attention_mask"] == 1) & (batch["labels"] == -100)
    prompt_positions[:, -12:] = False  # the positions that predict the answers
    drift = {}
    for anchor in (0.0, 10.0):
        model = tiny_model("tiny-llama", seed=0)[0]
        peft_model = get_peft_model(model, lora_config(model, "all-linear", rank=4))
        finetune(peft_model, [batch], steps=15, lr=2e-2, anchor_weight=anchor, anchor_tokens=1000, progress=False)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            adapted = F.log_softmax(peft_model(**inputs).logits, -1)[prompt_positions]
            with peft_model.disable_adapter():
                original = F.log_softmax(peft_model(**inputs).logits, -1)[prompt_positions]
        drift[anchor] = (adapted.exp() * (adapted - original)).sum(-1).mean().item()
    assert drift[10.0] < 0.7 * drift[0.0], drift
    with pytest.raises(ValueError, match="needs a peft model"):
        answer_loss(tiny_model("tiny-llama")[0], batch, anchor_weight=1.0)


def test_reference_cache_trains_the_same_and_runs_the_frozen_model_once_per_batch(llama):
    # the anchor's reference (the model without adapter) is the same for every adapter trained on one frozen model:
    # with a shared cache, two runs of four steps over the batches run it once per batch, and train exactly as without it
    _, tokenizer = llama
    batches = training_batches(tokenizer, _examples(), batch_size=2)
    assert 2 <= len(batches) < 4
    frozen = tiny_model("tiny-llama", seed=0)[0]

    def run(cache, steps, rank):
        torch.manual_seed(0)
        peft_model = get_peft_model(copy.deepcopy(frozen), lora_config(frozen, "all-linear", rank=rank))
        calls = []
        handle = peft_model.get_base_model().model.register_forward_hook(
            lambda module, args, output: calls.append(output.last_hidden_state.requires_grad))
        try:
            history = finetune(peft_model, batches, steps=steps, lr=1e-2, anchor_weight=1.0, anchor_tokens=4,
                               progress=False, reference_cache=cache)
        finally:
            handle.remove()
        frozen_passes = calls.count(False)  # the reference passes run without gradients
        return [row["loss"] for row in history.train], frozen_passes

    # a second adapter of another configuration (attention only) on the same frozen model shares the cache
    assert (model_fingerprint(get_peft_model(copy.deepcopy(frozen), lora_config(frozen, "all-linear", rank=2)), False)
            == model_fingerprint(get_peft_model(copy.deepcopy(frozen), lora_config(frozen, "attention", rank=8)), False))
    plain = [run(None, 4, 2), run(None, 4, 4)]
    cache = {}
    cached = [run(cache, 4, 2), run(cache, 4, 4)]
    assert [losses for losses, _ in cached] == [losses for losses, _ in plain]  # exactly the same training
    assert [passes for _, passes in plain] == [4, 4] and [passes for _, passes in cached] == [len(batches), 0]
    with pytest.raises(ValueError, match="another frozen model"):  # another frozen model: refused
        other = tiny_model("tiny-llama", seed=1)[0]
        finetune(get_peft_model(other, lora_config(other, "all-linear", rank=2)), batches, steps=1, anchor_weight=1.0,
                 anchor_tokens=4, progress=False, reference_cache=cache)
    unused = {}  # without the anchor there is no reference: the dict stays empty (CH06's exercise turns the anchor off)
    finetune(get_peft_model(copy.deepcopy(frozen), lora_config(frozen, "all-linear", rank=2)), batches, steps=1,
             progress=False, reference_cache=unused)
    assert unused == {}


@pytest.mark.parametrize("dora", [False, True])
def test_merged_adapter_saved_and_reloaded_gives_the_same_answers(tmp_path, dora):
    model, tokenizer = tiny_model("tiny-llama", seed=0)
    peft_model = get_peft_model(model, lora_config(model, "all-linear", rank=4, dora=dora))
    examples = _examples()
    finetune(peft_model, training_batches(tokenizer, examples, batch_size=2), steps=5, lr=1e-2, progress=False)
    ids = torch.tensor([prompt_token_ids(tokenizer, examples[1].prompt)])
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
    adapted_answers = classify(peft_model, tokenizer, examples)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name for name, _ in reloaded.named_parameters())
    with torch.no_grad():
        reloaded_logits = reloaded(input_ids=ids).logits
    assert (adapted - model(input_ids=ids).logits).abs().max() < 1e-4  # merged in place, same function
    assert torch.allclose(adapted, reloaded_logits, atol=1e-4)
    assert classify(reloaded, tokenizer, examples) == adapted_answers


def test_generation_in_padded_batches_equals_one_at_a_time(llama):
    model, tokenizer = llama
    examples = _examples("extract")
    together = generate_answers(model, tokenizer, examples, max_new_tokens=6, batch_size=4)
    alone = generate_answers(model, tokenizer, examples, max_new_tokens=6, batch_size=1)
    assert together == alone and len(together) == len(examples)


def test_specialist_report_scores_the_answers_it_returns(llama):
    model, tokenizer = llama
    classify_examples, extract_examples = _examples("classify"), _examples("extract")
    row, answers = specialist_report(model, tokenizer, classify_examples, extract_examples,
                                     wiki_ids=torch.randint(0, 100, (48,)), window=16, lm_eval_limit=2,
                                     max_new_tokens=6)
    assert answers["classify"] == classify(model, tokenizer, classify_examples)
    assert answers["extract"] == generate_answers(model, tokenizer, extract_examples, max_new_tokens=6)
    assert row["accuracy"] == classification_scores(answers["classify"], classify_examples)["accuracy"]
    assert row["json passed"] == extraction_scores(answers["extract"], extract_examples)["passed"]
    assert row["wiki ppl"] > 1 and {"rearch_analogy", "rearch_sms_spam"} <= set(row)


def test_extraction_checker():
    expected = {"label": "spam", "has_number": True, "has_url": False, "first_word": "win"}
    assert check_extraction(json.dumps(expected), expected)["passed"]
    wrong_type = check_extraction(json.dumps({**expected, "has_number": "true"}), expected)
    assert wrong_type["valid_json"] and wrong_type["right_keys"] and not wrong_type["has_number"]
    assert not wrong_type["passed"] and wrong_type["label"]
    extra_key = check_extraction(json.dumps({**expected, "note": 1}), expected)
    assert not extra_key["right_keys"] and not extra_key["passed"]
    broken = check_extraction('{"label": "spam", "has_number": tr', expected)
    assert not any(broken.values())
    assert not check_extraction("[1, 2]", expected)["valid_json"]
    examples = [Example("extract", "x", "spam", "p", json.dumps(expected))] * 2
    scores = extraction_scores([json.dumps(expected), "nonsense"], examples)
    assert scores["passed"] == 0.5 and scores["valid_json"] == 0.5 and scores["first_word"] == 0.5
    with pytest.raises(ValueError, match="one output per example"):
        extraction_scores(["{}"], examples)


def test_excluded_texts_never_reach_the_drawn_examples():
    # the validation split holds 40 spam messages once split on normalized text: 20 held out, 15 drawn around them
    held_out = sms_examples("validation", "classify", n_per_class=20, max_chars=40)
    train = sms_examples("validation", "classify", n_per_class=15, max_chars=40, seed=1,
                         exclude=[e.text for e in held_out])
    assert not {e.text for e in train} & {e.text for e in held_out}


def test_specialist_report_follows_the_tokenizers_bos_convention(llama):
    """Where the tokenizer begins a text with BOS (Llama 3, Gemma), so do the report's perplexity windows;
    the chat-formatted prompts get theirs from the chat template. lm-eval is stubbed: only the ids matter here."""
    from unittest import mock

    import pandas as pd

    from utils.evaluation import perplexity
    from utils.models import tiny_tokenizer

    model, plain = llama
    with_bos = tiny_tokenizer(add_bos=True)  # begins every text with BOS (id 256)
    wiki = torch.randint(0, 100, (48,))  # a stream without BOS
    stub = pd.DataFrame([{"task": "rearch_analogy", "metric": "acc", "value": 0.5, "stderr": 0.0}])
    with mock.patch("utils.specialize.run_lm_eval", return_value=stub):
        row, _ = specialist_report(model, with_bos, _examples("classify")[:2], _examples("extract")[:1],
                                   wiki_ids=wiki, window=16, max_new_tokens=2)
        plain_row, _ = specialist_report(model, plain, _examples("classify")[:2], _examples("extract")[:1],
                                         wiki_ids=wiki, window=16, max_new_tokens=2)
    assert row["wiki ppl"] == pytest.approx(perplexity(model, wiki, window=16, progress=False, bos_token_id=256))
    assert plain_row["wiki ppl"] == pytest.approx(perplexity(model, wiki, window=16, progress=False))
    assert row["wiki ppl"] != pytest.approx(plain_row["wiki ppl"])
    assert prompt_token_ids(with_bos, "hi")[0] == 256  # the chat template's own BOS
