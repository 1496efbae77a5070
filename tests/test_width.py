import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from utils.data import calibration_batches
from utils.hooks import capture_activations, count_hooks
from utils.models import glu_projections
from utils.width import (STATIC_NEURON_METHODS, activation_neuron_importance, activation_statistics,
                         static_neuron_importance)
from utils.models import decoder_layers, tiny_model
from utils.width import merged_statistics, neurons_to_keep, prune_glu_width, target_intermediate_size


def _batches(tokenizer, n=4, length=24):
    return calibration_batches(tokenizer, "wikipedia", n_samples=n, seq_len=length, batch_size=2)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits


def _reloads_exactly(model, folder):
    """Save `model`, load it back with plain from_pretrained, and compare the logits exactly."""
    model.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=model.dtype).to(model.device)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    return torch.equal(_logits(model, ids), _logits(reloaded, ids))


def test_target_sizes_and_rounding():
    assert target_intermediate_size(1536, 576, percent=20) == 1229
    assert target_intermediate_size(1536, 576, percent=20, multiple=64) == 1216
    assert target_intermediate_size(8192, 2048, percent=40, multiple=128) == 4864
    assert target_intermediate_size(1536, 576, intermediate_size=1000) == 1000
    assert target_intermediate_size(1536, 576, expansion_ratio=2.0) == 1152
    assert target_intermediate_size(128, 64, percent=99, multiple=64) == 64  # never below one multiple
    for bad in (0, 100, -5, 150):
        with pytest.raises(ValueError, match=r"percent.*\(0, 100\)"):
            target_intermediate_size(1536, 576, percent=bad)
    with pytest.raises(ValueError, match="1..1536"):
        target_intermediate_size(1536, 576, intermediate_size=2000)
    with pytest.raises(ValueError, match="1..1536"):
        target_intermediate_size(1536, 576, intermediate_size=0)
    with pytest.raises(ValueError, match="expansion_ratio"):
        target_intermediate_size(1536, 576, expansion_ratio=3.0)
    with pytest.raises(ValueError, match="exactly one"):
        target_intermediate_size(1536, 576, percent=10, intermediate_size=100)
    with pytest.raises(ValueError, match="multiple"):
        target_intermediate_size(1536, 576, percent=10, multiple=0)


def test_width_pruning_gives_a_standard_model_on_every_family(tiny, tmp_path):
    name, model, tokenizer = tiny
    scores = activation_neuron_importance(model, _batches(tokenizer), progress=False)
    assert scores.shape == (model.config.num_hidden_layers, model.config.intermediate_size)
    pruned = prune_glu_width(model, scores, percent=25)
    assert pruned.config.intermediate_size == 96 and model.config.intermediate_size == 128  # base untouched
    for layer in decoder_layers(pruned):
        gate, up, down = glu_projections(layer)
        assert gate.out_features == up.out_features == down.in_features == 96
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    pruned.save_pretrained(tmp_path / name)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=pruned.dtype).to(pruned.device)
    assert torch.equal(_logits(pruned, ids), _logits(reloaded, ids))
    generated = pruned.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 10)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_keeping_every_neuron_is_the_identity_and_pruning_keeps_the_chosen_neurons():
    model, tokenizer = tiny_model("tiny-llama")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    scores = static_neuron_importance(model, "peak_to_peak")
    same = prune_glu_width(model, scores, intermediate_size=model.config.intermediate_size)
    assert torch.equal(_logits(model, ids), _logits(same, ids))
    # the kept rows are exactly the highest-scoring ones, in their original order
    pruned = prune_glu_width(model, scores, percent=50)
    kept = neurons_to_keep(scores, 64)
    original = glu_projections(decoder_layers(model)[1])
    narrowed = glu_projections(decoder_layers(pruned)[1])
    assert torch.equal(narrowed[0].weight, original[0].weight[kept[1]])
    assert torch.equal(narrowed[2].weight, original[2].weight[:, kept[1]])


def test_refit_compensates_for_removed_neurons():
    model, tokenizer = tiny_model("tiny-llama")
    batches = _batches(tokenizer, n=16, length=32)
    statistics = activation_statistics(model, batches, gram=True, progress=False)
    assert count_hooks(model) == 0
    scores = activation_neuron_importance(model, batches, statistics=statistics)
    plain = prune_glu_width(model, scores, percent=50)
    refitted = prune_glu_width(model, scores, percent=50, gram=statistics["gram"], ridge=1e-4)

    with capture_activations(model, points=("mlp_in",)) as captured:  # what each MLP reads on calibration text
        for batch in batches:
            model(**batch)

    def output_error(candidate):  # MLP outputs against the unpruned MLPs' on those same inputs
        with torch.no_grad():
            return sum(float((layer.mlp(captured.stacked("mlp_in", i)) - full.mlp(captured.stacked("mlp_in", i))).pow(2).mean())
                       for i, (layer, full) in enumerate(zip(decoder_layers(candidate), decoder_layers(model))))

    assert output_error(refitted) < 0.9 * output_error(plain)
    # keeping every neuron, an unregularized re-fit gives back the original down_proj
    full = prune_glu_width(model, scores, intermediate_size=128, gram=statistics["gram"], ridge=0.0)
    torch.testing.assert_close(glu_projections(decoder_layers(full)[0])[2].weight,
                               glu_projections(decoder_layers(model)[0])[2].weight, atol=1e-4, rtol=1e-3)


def test_gram_is_the_full_product_of_the_activations():
    # the Gram matrix is computed block by block above the diagonal and mirrored; it must be A^T A / tokens of
    # the activations the MLPs produce, the same as the full product, at the width of tiny-llama and at an odd one
    model, tokenizer = tiny_model("tiny-llama")
    batches = _batches(tokenizer, n=4, length=24)
    for candidate in (model, prune_glu_width(model, torch.rand(len(decoder_layers(model)), 128), intermediate_size=77)):
        statistics = activation_statistics(candidate, batches, gram=True, progress=False)
        with capture_activations(candidate, points=("mlp_act",)) as captured:
            with torch.no_grad():
                for batch in batches:
                    candidate(**batch)
        for layer in range(len(decoder_layers(candidate))):
            activations = captured.stacked("mlp_act", layer).flatten(0, -2).double()
            expected = activations.T @ activations / statistics["tokens"]
            assert statistics["gram"][layer].shape == expected.shape
            torch.testing.assert_close(statistics["gram"][layer], expected, rtol=1e-5, atol=1e-7)
            assert torch.equal(statistics["gram"][layer], statistics["gram"][layer].T)


def test_merged_statistics_are_those_of_one_pass_over_both_sets_of_batches():
    model, tokenizer = tiny_model("tiny-llama")
    batches = _batches(tokenizer, n=6, length=24)  # 3 batches of 2 rows
    whole = activation_statistics(model, batches, gram=True, progress=False)
    merged = merged_statistics(activation_statistics(model, batches[:1], gram=True, progress=False),
                               activation_statistics(model, batches[1:], gram=True, progress=False))
    assert merged["tokens"] == whole["tokens"]
    for key in ("mean", "mean_abs", "mean_square", "gram"):
        torch.testing.assert_close(merged[key], whole[key], rtol=1e-5, atol=1e-7)
        assert merged[key].dtype == whole[key].dtype
    without_gram = activation_statistics(model, batches[:1], progress=False)
    assert "gram" not in merged_statistics(without_gram, activation_statistics(model, batches[1:], progress=False))
    with pytest.raises(ValueError, match="gram=True"):
        merged_statistics(without_gram, whole)
    with pytest.raises(ValueError, match="activation_statistics"):
        merged_statistics({"mean": whole["mean"]}, whole)


def test_activation_statistics_ignore_padding():
    model, tokenizer = tiny_model("tiny-llama")
    ids = torch.tensor([[10, 11, 12, 13]])
    padded = {"input_ids": torch.tensor([[10, 11, 12, 13, 258, 258]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0]])}
    a = activation_statistics(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], progress=False)
    b = activation_statistics(model, [padded], progress=False)
    assert a["tokens"] == b["tokens"] == 4
    torch.testing.assert_close(a["mean_abs"], b["mean_abs"], atol=1e-5, rtol=1e-4)


def test_static_methods_and_errors():
    model, _ = tiny_model("tiny-llama")
    for method in STATIC_NEURON_METHODS:
        scores = static_neuron_importance(model, method)
        assert scores.shape == (4, 128) and torch.isfinite(scores).all() and (scores >= 0).all()
    with pytest.raises(ValueError, match="Unknown static method"):
        static_neuron_importance(model, "magic")
    with pytest.raises(ValueError, match="Unknown activation method"):
        activation_neuron_importance(model, [], "magic")
    with pytest.raises(ValueError, match=r"shape \(4, 128\).*per-layer widths are not supported"):
        prune_glu_width(model, torch.ones(2, 128), percent=10)
    with pytest.raises(ValueError, match=r"percent.*\(0, 100\)"):
        prune_glu_width(model, torch.ones(4, 128), percent=0)
    with pytest.raises(ValueError, match="1..128"):
        prune_glu_width(model, torch.ones(4, 128), intermediate_size=129)


class _FusedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Linear(64, 256, bias=False)
        self.down_proj = nn.Linear(128, 64, bias=False)


class _ClassicMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)


@pytest.mark.parametrize("mlp, message", [(_FusedMLP, "fused gate_up"), (_ClassicMLP, "no GLU")])
def test_models_without_a_glu_mlp_are_refused(mlp, message):
    model, _ = tiny_model("tiny-llama")
    for layer in decoder_layers(model):
        layer.mlp = mlp()
    with pytest.raises(ValueError, match=message):
        static_neuron_importance(model)
    with pytest.raises(ValueError, match=message):
        prune_glu_width(model, torch.ones(4, 128), percent=10)


# --- published criteria: FLAP, Wanda-style, first-order Taylor, bias compensation -------------------------

from utils.width import (LITERATURE_NEURON_METHODS, literature_neuron_importance,  # noqa: E402
                         prune_glu_width_with_bias, taylor_neuron_importance)


def test_literature_and_taylor_scores_on_every_family(tiny, tmp_path):
    name, model, tokenizer = tiny
    batches = _batches(tokenizer)
    statistics = activation_statistics(model, batches, progress=False)
    shape = (model.config.num_hidden_layers, model.config.intermediate_size)
    flags = [p.requires_grad for p in model.parameters()]
    for scores in [literature_neuron_importance(model, statistics, method) for method in LITERATURE_NEURON_METHODS] + \
                  [taylor_neuron_importance(model, batches, aggregate, progress=False) for aggregate in ("sum", "squares")]:
        assert scores.shape == shape and torch.isfinite(scores).all() and (scores >= 0).all() and scores.max() > 0
        pruned = prune_glu_width(model, scores, percent=25)
        assert pruned.config.intermediate_size == 96
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training  # restored
    assert all(p.grad is None for p in model.parameters())
    if "mlp_bias" not in model.config.to_dict():  # the family cannot store an MLP bias: a clear refusal
        with pytest.raises(ValueError, match="no `mlp_bias`"):
            prune_glu_width_with_bias(model, scores, statistics["mean"], percent=25)
        return
    compensated = prune_glu_width_with_bias(model, scores, statistics["mean"], percent=25)
    assert compensated.config.mlp_bias and not model.config.mlp_bias  # base untouched
    assert _reloads_exactly(compensated, tmp_path / name)


def test_flap_is_the_fluctuation_and_wanda_the_weighted_norm():
    model, tokenizer = tiny_model("tiny-llama")
    statistics = activation_statistics(model, _batches(tokenizer), progress=False)
    down = glu_projections(decoder_layers(model)[2])[2].weight.float()
    variance = statistics["mean_square"][2].double() - statistics["mean"][2].double() ** 2
    torch.testing.assert_close(literature_neuron_importance(model, statistics, "flap")[2].double(),
                               variance.clamp_min(0) * down.pow(2).sum(0).double(), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(literature_neuron_importance(model, statistics, "wanda")[2],
                               statistics["mean_square"][2].sqrt() * down.abs().sum(0), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="Unknown method 'magic'"):
        literature_neuron_importance(model, statistics, "magic")
    with pytest.raises(ValueError, match="lacks"):
        literature_neuron_importance(model, {"mean_abs": statistics["mean_abs"]}, "flap")


def test_taylor_predicts_the_loss_change_of_removing_one_neuron():
    model, tokenizer = tiny_model("tiny-llama")
    batch = _batches(tokenizer, n=2, length=24)[:1]
    signed = taylor_neuron_importance(model, batch, "sum", progress=False)
    assert model.training is False and all(p.grad is None for p in model.parameters())
    labels = batch[0]["input_ids"].masked_fill(batch[0]["attention_mask"] == 0, -100)

    def loss(candidate):
        with torch.no_grad():
            return float(candidate(**batch[0], labels=labels).loss)

    base = loss(model)
    layer, neuron = divmod(int(torch.argmax(signed)), signed.shape[1])
    down = glu_projections(decoder_layers(model)[layer])[2]
    saved = down.weight[:, neuron].clone()
    with torch.no_grad():
        down.weight[:, neuron] = 0
    change = abs(loss(model) - base)
    with torch.no_grad():
        down.weight[:, neuron] = saved
    assert change == pytest.approx(float(signed[layer, neuron]), rel=0.5)  # first order, on the largest neuron
    with pytest.raises(ValueError, match="aggregate"):
        taylor_neuron_importance(model, batch, "mean")
    with pytest.raises(ValueError, match="empty"):
        taylor_neuron_importance(model, [])


def test_bias_compensation_restores_the_mean_output():
    model, tokenizer = tiny_model("tiny-llama")
    batches = _batches(tokenizer, n=16, length=32)
    statistics = activation_statistics(model, batches, gram=True, progress=False)
    scores = literature_neuron_importance(model, statistics, "flap")
    plain = prune_glu_width(model, scores, percent=50)
    compensated = prune_glu_width_with_bias(model, scores, statistics["mean"], percent=50)
    refitted = prune_glu_width_with_bias(model, scores, statistics["mean"], percent=50, gram=statistics["gram"])
    with capture_activations(model, points=("mlp_in",)) as captured:
        for batch in batches:
            model(**batch)
    masks = torch.cat([b["attention_mask"].reshape(-1) for b in batches]).bool()

    def mean_error(candidate, layer):  # mean MLP output over the real tokens, against the unpruned MLP's
        with torch.no_grad():
            x = captured.stacked("mlp_in", layer).reshape(-1, model.config.hidden_size)[masks]
            difference = decoder_layers(candidate)[layer].mlp(x) - decoder_layers(model)[layer].mlp(x)
            return float(difference.mean(0).norm()), float(difference.pow(2).mean())

    for layer in range(model.config.num_hidden_layers):
        assert mean_error(compensated, layer)[0] < 1e-4 + 0.01 * mean_error(plain, layer)[0]
        assert mean_error(refitted, layer)[1] <= mean_error(compensated, layer)[1] * 1.001
    with pytest.raises(ValueError, match="`mean` must have shape"):
        prune_glu_width_with_bias(model, scores, statistics["mean"][:2], percent=50)
    with pytest.raises(ValueError, match="ridge"):
        prune_glu_width_with_bias(model, scores, statistics["mean"], percent=50, ridge=-1.0)
    assert not model.config.mlp_bias and glu_projections(decoder_layers(model)[0])[2].bias is None


def test_gradual_pruning_on_every_family(tiny, tmp_path):
    from utils.width import prune_glu_width_in_steps

    name, model, tokenizer = tiny
    calibration = _batches(tokenizer)
    heal = calibration_batches(tokenizer, "wikipedia", n_samples=8, seq_len=24, batch_size=2, split="train")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    pruned = prune_glu_width_in_steps(model, calibration, heal, percent=25, rounds=2, heal_steps=2, lr=1e-3,
                                      progress=False).eval()
    assert pruned.config.intermediate_size == 96 and model.config.intermediate_size == 128
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())  # the base is untouched
    assert _reloads_exactly(pruned, tmp_path / name)


def test_gradual_pruning_is_one_cut_in_one_round_and_heals_on_its_own_batches():
    from utils.width import literature_neuron_importance, prune_glu_width_in_steps

    model, tokenizer = tiny_model("tiny-llama")
    calibration = _batches(tokenizer)
    heal = calibration_batches(tokenizer, "wikipedia", n_samples=8, seq_len=24, batch_size=2, split="train")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    statistics = activation_statistics(model, calibration, gram=True, progress=False)
    one_cut = prune_glu_width(model, literature_neuron_importance(model, statistics, "flap"), percent=25,
                              gram=statistics["gram"])
    one_round = prune_glu_width_in_steps(model, calibration, heal, percent=25, rounds=1, heal_steps=0, progress=False)
    assert torch.equal(_logits(one_cut, ids), _logits(one_round, ids))
    reused = prune_glu_width_in_steps(model, calibration, heal, percent=25, rounds=1, heal_steps=0,
                                      statistics=statistics, progress=False)  # the first pass, already made
    assert torch.equal(_logits(one_cut, ids), _logits(reused, ids))
    with pytest.raises(ValueError, match="gram"):
        prune_glu_width_in_steps(model, calibration, heal, percent=25, statistics={"mean": 0, "mean_square": 0})
    unhealed = prune_glu_width_in_steps(model, calibration, heal, percent=50, rounds=2, heal_steps=0, progress=False)
    cache = {}
    healed = prune_glu_width_in_steps(model, calibration, heal, percent=50, rounds=2, heal_steps=2, lr=3e-3,
                                      teacher_cache=cache, progress=False)
    assert healed.config.intermediate_size == unhealed.config.intermediate_size == 64
    assert not torch.equal(_logits(healed, ids), _logits(unhealed, ids))  # the heals trained it
    assert len([key for key in cache if key not in ("teacher", "checked")]) == 4  # each round on its own 2 batches
    # (whether the heals help is a question for a real model: CH05 measures it on the embedded one)
    with pytest.raises(ValueError, match="percent"):
        prune_glu_width_in_steps(model, calibration, heal, percent=100)
    with pytest.raises(ValueError, match="method"):
        prune_glu_width_in_steps(model, calibration, heal, percent=20, method="taylor")
