"""Fair pruning utilities on tiny models: prompt pairs, the bias metric, neuron scores, interventions."""

import pytest
import torch

from utils.bias import (ATTRIBUTES, FILLERS, PromptPair, TEMPLATES, bias_attribution, bias_by_attribute,
                        bias_from_gaps, check_equal_lengths, continuation_logprobs, evaluate_pruning,
                        fair_pruning_scores, neuron_bias_scores, neuron_count, neuron_utility, neurons_scaled,
                        pair_activations, prompt_pairs, random_neurons, same_length_pairs, scale_neurons_,
                        stereotype_bias, stereotype_gaps, token_differences, top_neurons)
from utils.hooks import count_hooks
from utils.models import decoder_layers, load_model, model_device


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")


def down_proj_weights(model):
    return [block.mlp.down_proj.weight.detach().clone() for block in decoder_layers(model)]


def test_pairs_split_by_template_and_cover_every_attribute():
    find, held_out = prompt_pairs("find"), prompt_pairs("held_out")
    assert {p.attribute for p in find} == {p.attribute for p in held_out} == set(ATTRIBUTES)
    find_templates = {(p.attribute, p.template) for p in find}
    held_templates = {(p.attribute, p.template) for p in held_out}
    assert not find_templates & held_templates
    assert len(find) + len(held_out) == len(prompt_pairs("all"))
    assert len(prompt_pairs("all")) == sum(len(TEMPLATES[a]) * len(FILLERS[a]) for a in ATTRIBUTES)
    gender = prompt_pairs("find", "gender")
    assert gender and all(p.attribute == "gender" for p in gender)
    assert gender[0].context_a != gender[0].context_b


@pytest.mark.parametrize("call, message", [
    (lambda: prompt_pairs("find", ["gender", "height"]), "Unknown attributes"),
    (lambda: prompt_pairs("train"), "Unknown split"),
])
def test_bad_pair_requests_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_empty_pair_set_is_refused(llama):
    model, tokenizer = llama
    for call in (lambda: stereotype_gaps(model, tokenizer, []), lambda: pair_activations(model, tokenizer, []),
                 lambda: bias_attribution(model, tokenizer, []), lambda: check_equal_lengths(tokenizer, [])):
        with pytest.raises(ValueError, match="empty"):
            call()


def test_unequal_lengths_are_refused_where_tokens_are_compared(llama):
    model, tokenizer = llama  # byte tokenizer: "woman" and "man" differ in length
    pair = prompt_pairs("find", "gender")[0]
    with pytest.raises(ValueError, match="different lengths"):
        check_equal_lengths(tokenizer, [pair])
    with pytest.raises(ValueError, match="different lengths"):
        token_differences(model, tokenizer, pair)
    kept = same_length_pairs(tokenizer, prompt_pairs("find"))
    assert kept and all(len(tokenizer(p.context_a)["input_ids"]) == len(tokenizer(p.context_b)["input_ids"]) for p in kept)
    differences = token_differences(model, tokenizer, kept[0], layers=[1, 3])
    n_tokens = len(tokenizer(kept[0].context_a, add_special_tokens=False)["input_ids"])
    assert differences.shape == (2, n_tokens, model.config.intermediate_size)
    first = next(i for i, (a, b) in enumerate(zip(kept[0].context_a, kept[0].context_b)) if a != b)
    assert torch.all(differences[:, :first] == 0) and differences[:, first:].abs().sum() > 0
    assert count_hooks(model) == 0


def test_continuation_logprobs_match_a_plain_forward(llama):
    model, tokenizer = llama
    context, continuation = "The cat sat", " on"
    ids = tokenizer(context + continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        ids = ids.to(model.device)
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    expected = logprobs[n_context - 1:].sum()
    scored = continuation_logprobs(model, tokenizer, [context, "A much longer context to force padding"],
                                   [continuation, " x"])
    assert torch.allclose(scored[0], expected, atol=1e-4)


def test_bias_metric_definition():
    gaps = torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, 3.0]])
    metric = bias_from_gaps(gaps)
    assert metric["bias"] == pytest.approx(2 / 3) and metric["signed"] == pytest.approx(0.0) and metric["pairs"] == 3
    with pytest.raises(ValueError, match="shape"):
        bias_from_gaps(torch.zeros(3, 3))


def test_swapping_the_sides_flips_the_sign_not_the_bias(llama):
    model, tokenizer = llama
    pairs = prompt_pairs("held_out", "religion")[:4]
    swapped = [PromptPair(p.attribute, p.template, p.context_b, p.context_a, p.stereotyped, p.anti_stereotyped)
               for p in pairs]
    metric, metric_swapped = stereotype_bias(model, tokenizer, pairs), stereotype_bias(model, tokenizer, swapped)
    assert metric["bias"] > 0
    assert metric_swapped["bias"] == pytest.approx(metric["bias"], rel=1e-4)
    assert metric_swapped["signed"] == pytest.approx(-metric["signed"], rel=1e-4, abs=1e-5)


def test_activation_scores_shape_and_sign(llama):
    model, tokenizer = llama
    pairs = prompt_pairs("find", ["gender", "age"])[:6]
    activations = pair_activations(model, tokenizer, pairs, progress=False)
    n_layers, width = model.config.num_hidden_layers, model.config.intermediate_size
    assert activations.shape == (6, 2, n_layers, width)
    raw = neuron_bias_scores(activations, standardize=False)
    assert raw.shape == (n_layers, width)
    assert torch.allclose(raw, (activations[:, 0] - activations[:, 1]).mean(0))
    flipped = neuron_bias_scores(activations.flip(1))
    assert torch.allclose(flipped, -neuron_bias_scores(activations), atol=1e-6)
    last = pair_activations(model, tokenizer, pairs, pooling="last", layers=[0, 2], progress=False)
    assert last.shape == (6, 2, 2, width)
    with pytest.raises(ValueError, match="Unknown pooling"):
        pair_activations(model, tokenizer, pairs, pooling="middle")
    assert count_hooks(model) == 0


def test_bias_attribution_predicts_the_effect_of_a_small_scaling():
    model, tokenizer = load_model("tiny-llama", dtype=torch.float64)  # a first-order check needs exact arithmetic
    pairs = prompt_pairs("find", "nationality")[:4]
    before = down_proj_weights(model)
    flags = [p.requires_grad for p in model.parameters()]
    scores = bias_attribution(model, tokenizer, pairs, gated_tokens="all", batch_size=3, progress=False)
    assert scores.shape == (model.config.num_hidden_layers, model.config.intermediate_size)
    assert count_hooks(model) == 0 and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, down_proj_weights(model)))
    # dB/ds: scaling the strongest neuron by (1 - eps) changes the objective by about -eps * score
    layer, neuron = divmod(int(scores.abs().argmax()), scores.shape[1])
    gaps = stereotype_gaps(model, tokenizer, pairs)
    signs = torch.sign(gaps[:, 0] - gaps[:, 1])
    eps = 1e-2
    with neurons_scaled(model, {layer: [neuron]}, 1 - eps):
        scaled = stereotype_gaps(model, tokenizer, pairs)
    change = (signs * ((scaled[:, 0] - scaled[:, 1]) - (gaps[:, 0] - gaps[:, 1]))).mean()
    assert float(change) == pytest.approx(-eps * float(scores[layer, neuron]), rel=0.1, abs=1e-6)
    attribute_only = bias_attribution(model, tokenizer, pairs, progress=False)
    assert not torch.allclose(attribute_only, scores)
    with pytest.raises(ValueError, match="Unknown gated_tokens"):
        bias_attribution(model, tokenizer, pairs, gated_tokens="last")


def test_top_and_random_neurons():
    scores = torch.zeros(3, 10)
    scores[0, 4], scores[2, 7], scores[1, 1] = 5.0, -9.0, 2.0
    assert top_neurons(scores, 2) == {0: [4], 2: [7]}
    assert top_neurons(scores, 2, absolute=False) == {0: [4], 1: [1]}
    first, again = random_neurons(3, 10, 5, seed=1), random_neurons(3, 10, 5, seed=1)
    assert first == again and neuron_count(first) == 5
    assert any(random_neurons(3, 10, 5, seed=s) != first for s in range(2, 6))
    like = {0: [1, 2], 2: [3]}
    matched = random_neurons(3, 10, 3, seed=0, like=like)
    assert {k: len(v) for k, v in matched.items()} == {0: 2, 2: 1}
    with pytest.raises(ValueError, match="count must be"):
        top_neurons(scores, 31)
    with pytest.raises(ValueError, match="not 4"):
        random_neurons(3, 10, 4, seed=0, like=like)


def test_neurons_scaled_restores_weights_exactly(tiny):
    name, model, tokenizer = tiny
    before = down_proj_weights(model)
    neurons = {0: [1, 5], model.config.num_hidden_layers - 1: [0]}
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        reference = model(ids.to(model.device)).logits
        with neurons_scaled(model, neurons, 0.0):
            weight = decoder_layers(model)[0].mlp.down_proj.weight
            assert torch.all(weight[:, [1, 5]] == 0) and torch.equal(weight[:, 0], before[0][:, 0])
            assert not torch.allclose(model(ids.to(model.device)).logits, reference)
    assert all(torch.equal(a, b) for a, b in zip(before, down_proj_weights(model)))
    with pytest.raises(RuntimeError):
        with neurons_scaled(model, neurons, 0.5):
            raise RuntimeError("inside")
    assert all(torch.equal(a, b) for a, b in zip(before, down_proj_weights(model)))


def test_pruning_a_neuron_equals_zeroing_its_activation(llama):
    model, tokenizer = llama
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    handle = decoder_layers(model)[1].mlp.down_proj.register_forward_pre_hook(
        lambda module, args: (args[0] * (torch.arange(args[0].shape[-1], device=args[0].device) != 3),))
    try:
        with torch.no_grad():
            zeroed = model(ids.to(model.device)).logits
    finally:
        handle.remove()
    with torch.no_grad(), neurons_scaled(model, {1: [3]}):
        pruned = model(ids.to(model.device)).logits
    assert torch.allclose(zeroed, pruned, atol=1e-5)


def test_scale_in_place_and_bad_neuron_sets(tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = load_model("tiny-qwen3")
    before = down_proj_weights(model)
    scale_neurons_(model, {2: [0, 3]}, factor=0.25)
    weight = decoder_layers(model)[2].mlp.down_proj.weight
    assert torch.allclose(weight[:, [0, 3]], before[2][:, [0, 3]] * 0.25)
    assert model.config.intermediate_size == before[2].shape[1]
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(decoder_layers(reloaded)[2].mlp.down_proj.weight.to(weight.device), weight)
    for neurons, factor, message in [({9: [0]}, 0.0, "out of range"), ({0: [500]}, 0.0, "out of range"),
                                     ({0: [1, 1]}, 0.0, "Duplicate"), ({0: [1]}, 1.5, "factor")]:
        with pytest.raises(ValueError, match=message):
            scale_neurons_(model, neurons, factor)


def test_neuron_utility_cost_predicts_a_small_scaling():
    from utils.data import calibration_batches
    from utils.importance import calibration_loss

    model, tokenizer = load_model("tiny-llama", dtype=torch.float64)  # a first-order check needs exact arithmetic
    batches = calibration_batches(tokenizer, "wikipedia", n_samples=2, seq_len=32, batch_size=2)
    utility = neuron_utility(model, batches, progress=False)
    shape = (model.config.num_hidden_layers, model.config.intermediate_size)
    assert utility["cost"].shape == utility["magnitude"].shape == shape
    assert torch.all(utility["magnitude"] >= 0) and count_hooks(model) == 0
    layer, neuron = divmod(int(utility["cost"].abs().argmax()), shape[1])
    eps = 1e-2
    base = calibration_loss(model, batches)
    with neurons_scaled(model, {layer: [neuron]}, 1 - eps):
        change = calibration_loss(model, batches) - base
    assert change == pytest.approx(eps * float(utility["cost"][layer, neuron]), rel=0.1, abs=1e-7)
    with pytest.raises(ValueError, match="non-empty list"):
        neuron_utility(model, [])


def test_fair_pruning_scores_protect_and_penalize():
    gain = torch.tensor([[5.0, 1.0], [1.0, 0.5], [2.0, 1.0], [9.0, 9.0]])
    utility = {"cost": torch.tensor([[0.0, 0.0], [0.0, 0.1], [-0.3, 0.0], [0.0, 0.0]]),
               "magnitude": torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 100.0], [1.0, 1.0]])}
    scores = fair_pruning_scores(gain, utility, cost_weight=2.0, magnitude_quantile=0.9)
    assert torch.isinf(scores[0]).all() and torch.isinf(scores[3]).all()  # first and last blocks protected
    assert torch.isinf(scores[2, 1])  # huge magnitude
    assert scores[1, 1] == pytest.approx(0.3) and scores[2, 0] == pytest.approx(1.4)  # |cost| penalized
    assert top_neurons(scores, 2, absolute=False) == {1: [0], 2: [0]}
    with pytest.raises(ValueError, match="share one shape"):
        fair_pruning_scores(gain[:2], utility)
    with pytest.raises(ValueError, match="protect_first"):
        fair_pruning_scores(gain, utility, protect_first=2, protect_last=2)


def test_bias_by_attribute_and_evaluate_pruning(llama):
    from utils.data import token_ids

    model, tokenizer = llama
    pairs = prompt_pairs("held_out", "gender")[:3] + prompt_pairs("held_out", "age")[:2]
    gaps = stereotype_gaps(model, tokenizer, pairs)
    per_attribute = bias_by_attribute(gaps, pairs)
    assert set(per_attribute) == {"gender", "age"}
    with pytest.raises(ValueError, match="rows of gaps"):
        bias_by_attribute(gaps[:2], pairs)
    ids = token_ids(tokenizer, "wikipedia", "eval", max_tokens=64)
    before = down_proj_weights(model)
    untouched = evaluate_pruning(model, tokenizer, {}, pairs, ids, window=32)
    assert untouched["bias"] == pytest.approx(bias_from_gaps(gaps)["bias"], rel=1e-5)
    pruned = evaluate_pruning(model, tokenizer, {1: list(range(0, 128, 2))}, pairs, ids, window=32)
    assert pruned["perplexity"] != pytest.approx(untouched["perplexity"])
    assert all(torch.equal(a, b) for a, b in zip(before, down_proj_weights(model)))


def test_contexts_and_perplexity_windows_begin_with_bos_where_the_tokenizer_adds_one(llama):
    """evaluate_pruning (and every bias measurement) turns text into ids the way the tokenizer begins a text."""
    from utils.data import token_ids
    from utils.evaluation import perplexity
    from utils.models import tiny_tokenizer

    model, plain = llama
    with_bos = tiny_tokenizer(add_bos=True)  # begins every text with BOS (id 256), as Llama 3 does
    pairs = prompt_pairs("held_out", "gender")[:2]
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"][:, 0].tolist()),
                                           with_kwargs=True)
    try:
        ids = token_ids(plain, "wikipedia", "eval", max_tokens=64)  # a stream without BOS
        report = evaluate_pruning(model, with_bos, {}, pairs, ids, window=32)
        assert seen and all(first == [256] * len(first) for first in seen)
        seen.clear()
        untouched = evaluate_pruning(model, plain, {}, pairs, ids, window=32)
        assert 256 not in sum(seen, [])
    finally:
        hook.remove()
    assert report["perplexity"] == pytest.approx(perplexity(model, ids, window=32, progress=False, bos_token_id=256))
    assert untouched["perplexity"] == pytest.approx(perplexity(model, ids, window=32, progress=False))
    assert torch.allclose(report["gaps"], stereotype_gaps(model, with_bos, pairs))
    assert not torch.allclose(report["gaps"], untouched["gaps"])
    context, continuation = pairs[0].context_a, pairs[0].stereotyped
    encode = lambda text: plain(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids = torch.tensor([[256] + encode(context) + encode(continuation)], device=model_device(model))
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0, :-1].gather(-1, ids[0, 1:, None])
    by_hand = logprobs[-len(encode(continuation)):].sum()
    assert continuation_logprobs(model, with_bos, [context], [continuation])[0] == pytest.approx(float(by_hand), abs=1e-4)
