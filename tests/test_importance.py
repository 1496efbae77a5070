import math

import pytest
import torch
import torch.nn.functional as F

from utils import importance
from utils.data import calibration_batches
from utils.hooks import capture_activations, count_hooks
from utils.importance import (angular_distance, angular_distances, block_influence, calibration_loss, iterative_loss_pruning,
                              layer_importance, position_importance, weight_magnitude_importance)
from utils.models import decoder_layers, tiny_model
from utils.depth import layers_removed, remove_layers, select_by_importance, select_last

PAD = 258


def _rows(*lengths: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (length,), generator=generator) for length in lengths]


def _padded(rows: list[torch.Tensor], pad: int = PAD, extra: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch of `rows`, `extra` columns wider than needed."""
    width = max(len(row) for row in rows) + extra
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _by_hand(model, rows: list[torch.Tensor], window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block influence and angular distance computed from stored captures, one unpadded row at a time."""
    n_layers = len(decoder_layers(model))
    ones, angles = [[] for _ in range(n_layers)], [[] for _ in range(n_layers - window + 1)]
    for row in rows:
        with capture_activations(model) as captured:
            model(row[None].to(model.device))
        for layer in range(n_layers):
            x, y = captured["block_in", layer][0][0], captured["block_out", layer][0][0]
            ones[layer].append(1 - F.cosine_similarity(x, y, dim=-1))
        for start in range(n_layers - window + 1):
            x, y = captured["block_in", start][0][0], captured["block_out", start + window - 1][0][0]
            angles[start].append(torch.arccos(F.cosine_similarity(x, y, dim=-1).clamp(-1, 1)) / math.pi)
    return (torch.stack([torch.cat(v).mean() for v in ones]), torch.stack([torch.cat(v).mean() for v in angles]))


def test_scores_match_a_hand_computation_on_a_padded_batch(tiny):
    name, model, _ = tiny
    model = model.float()  # the hand computation is the reference: compare in float32 whatever the lane's dtype
    rows = _rows(11, 5, 8)
    influence, distance = _by_hand(model, rows, window=2)
    scores = layer_importance(model, [_padded(rows[:2]), _padded(rows[2:])], window_blocks=2, progress=False)
    torch.testing.assert_close(scores["block_influence"], influence, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores["angular_distance"], distance, rtol=1e-4, atol=1e-6)
    assert scores["block_influence"].shape == (len(decoder_layers(model)),)
    assert count_hooks(model) == 0


def test_padding_does_not_change_the_scores():
    model, _ = tiny_model("tiny-llama")
    rows = _rows(12, 4, 9, seed=1)
    alone = layer_importance(model, [{"input_ids": row[None]} for row in rows], window_blocks=3, progress=False)
    together = layer_importance(model, [_padded(rows, extra=5)], window_blocks=3, progress=False)
    other_pad = _padded(rows, pad=7, extra=5)
    padding = other_pad["attention_mask"] == 0
    other_pad["input_ids"][padding] = torch.arange(int(padding.sum())) % 250  # varied ids at the padded places
    garbage = layer_importance(model, [other_pad], window_blocks=3, progress=False)
    with_empty_row = _padded(rows + [torch.tensor([], dtype=torch.long)], extra=2)
    empty = layer_importance(model, [with_empty_row], window_blocks=3, progress=False)
    for key in ("block_influence", "angular_distance"):
        for other in (together, garbage, empty):
            assert torch.isfinite(other[key]).all()
            torch.testing.assert_close(other[key], alone[key], rtol=1e-4, atol=1e-6)
    # counting padding would change them: the unmasked scores differ
    unmasked = layer_importance(model, [{"input_ids": other_pad["input_ids"]}], window_blocks=3, progress=False)
    assert not torch.allclose(unmasked["block_influence"], alone["block_influence"], rtol=1e-3)


def test_window_one_angular_distance_is_arccos_of_block_influence():
    model, _ = tiny_model("tiny-gemma3")
    one_token = [{"input_ids": torch.tensor([[42]]), "attention_mask": torch.tensor([[1]])}]
    scores = layer_importance(model, one_token, window_blocks=1, progress=False)
    expected = torch.arccos(1 - scores["block_influence"]) / math.pi  # one token: cos = 1 - influence
    torch.testing.assert_close(scores["angular_distance"], expected, rtol=1e-4, atol=1e-6)
    batches = [_padded(_rows(7, 3))]
    assert torch.equal(block_influence(model, batches, progress=False),
                       layer_importance(model, batches, window_blocks=4, progress=False)["block_influence"])
    assert angular_distance(model, batches, 4, progress=False).shape == (3,)
    whole = angular_distance(model, batches, 6, progress=False)
    assert whole.shape == (1,) and 0 <= whole.item() <= 1


def test_several_window_sizes_from_one_pass_equal_one_pass_per_size(tiny):
    _, model, _ = tiny
    n_layers = len(decoder_layers(model))
    batches = [_padded(_rows(9, 4)), _padded(_rows(6, 6, 2), extra=1)]
    sizes = sorted({1, 2, n_layers - 1, n_layers})
    together = angular_distances(model, batches, sizes, progress=False)
    assert sorted(together) == sizes
    for n in sizes:
        assert torch.equal(together[n], angular_distance(model, batches, n, progress=False)), n
    # and the block influence of the shared pass is unchanged
    assert torch.equal(layer_importance(model, batches, window_blocks=2, progress=False)["block_influence"],
                       block_influence(model, batches, progress=False))
    for bad in ([], [0], [n_layers + 1], [2, 2], 3, [True]):
        with pytest.raises(ValueError, match="sizes"):
            angular_distances(model, batches, bad, progress=False)


def test_scores_run_in_eval_mode_and_restore_the_training_flags():
    model, _ = tiny_model("tiny-llama", attention_dropout=0.5)
    batches = [_padded(_rows(10, 6))]
    expected = layer_importance(model, batches, window_blocks=2, progress=False)
    model.train()
    model.model.norm.eval()  # a mixed state must come back as it was
    first = layer_importance(model, batches, window_blocks=2, progress=False)
    second = calibration_loss(model, batches), calibration_loss(model, batches)
    assert model.training and not model.model.norm.training and decoder_layers(model)[0].training
    assert torch.equal(first["block_influence"], expected["block_influence"])
    assert second[0] == second[1]
    chosen = [iterative_loss_pruning(model, batches, 1, progress=False) for _ in range(2)]
    assert chosen[0] == chosen[1]
    assert model.training and not model.model.norm.training


def test_hooks_are_removed_and_flags_restored_when_the_forward_pass_raises():
    model, _ = tiny_model("tiny-llama")
    model.train()
    bad = [_padded(_rows(5)), {"input_ids": torch.tensor([[1, 10**6]])}]  # beyond the vocabulary
    with pytest.raises(IndexError):
        layer_importance(model, bad, window_blocks=2, progress=False)
    assert count_hooks(model) == 0 and model.training
    with pytest.raises(ValueError, match="vocabulary"):  # batch_nll refuses the ids inside the trial removal
        iterative_loss_pruning(model, bad, 1, progress=False)
    assert model.config.num_hidden_layers == 4 and len(decoder_layers(model)) == 4
    assert [block.self_attn.layer_idx for block in decoder_layers(model)] == [0, 1, 2, 3]
    assert count_hooks(model) == 0 and model.training


def test_bad_batches_and_windows_are_clear_errors():
    model, _ = tiny_model("tiny-llama")
    good = [_padded(_rows(4))]
    with pytest.raises(ValueError, match="empty"):
        block_influence(model, [])
    with pytest.raises(ValueError, match="single dict"):
        block_influence(model, good[0])
    with pytest.raises(ValueError, match="'input_ids'"):
        block_influence(model, [{"ids": torch.zeros(1, 3, dtype=torch.long)}])
    with pytest.raises(ValueError, match="2-D"):
        block_influence(model, [{"input_ids": torch.zeros(3, dtype=torch.long)}])
    with pytest.raises(ValueError, match="attention_mask"):
        block_influence(model, [{"input_ids": torch.zeros(1, 3, dtype=torch.long),
                                 "attention_mask": torch.ones(1, 4, dtype=torch.long)}])
    with pytest.raises(ValueError, match="no real token"):
        block_influence(model, [{"input_ids": torch.zeros(1, 3, dtype=torch.long),
                                 "attention_mask": torch.zeros(1, 3, dtype=torch.long)}])
    for window in (0, 5):
        with pytest.raises(ValueError, match=r"1..4"):
            angular_distance(model, good, window)
    assert count_hooks(model) == 0


def _batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    return [_padded(_rows(12, 8, seed=seed)), _padded(_rows(10, 12, seed=seed + 1))]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_iterative_pruning_matches_brute_force(name):
    model, _ = tiny_model(name)
    batches = _batches()
    n_layers = len(decoder_layers(model))
    logits = model(batches[0]["input_ids"]).logits
    blocks = list(decoder_layers(model))

    losses = {i: calibration_loss(remove_layers(model, [i]), batches) for i in range(n_layers)}
    first = min(losses, key=losses.get)
    assert sorted(losses.values())[1] - losses[first] > 1e-4  # a clear winner, not a rounding tie
    pairs = {j: calibration_loss(remove_layers(model, [first, j]), batches) for j in range(n_layers) if j != first}
    second = min(pairs, key=pairs.get)
    assert iterative_loss_pruning(model, batches, 2, progress=False) == [first, second]

    inner = {i: losses[i] for i in range(1, n_layers - 1)}
    protected = iterative_loss_pruning(model, batches, 1, protect_first=1, protect_last=1, progress=False)
    assert protected == [min(inner, key=inner.get)]
    # the model is exactly as before
    assert list(decoder_layers(model)) == blocks and model.config.num_hidden_layers == n_layers
    assert [block.self_attn.layer_idx for block in decoder_layers(model)] == list(range(n_layers))
    assert torch.equal(model(batches[0]["input_ids"]).logits, logits)


def test_iterative_pruning_restores_the_model_when_a_trial_raises(monkeypatch):
    model, _ = tiny_model("tiny-gemma3")
    types = list(model.config.layer_types)
    calls = {"n": 0}
    real = importance.calibration_loss

    def failing(model_, batches):
        calls["n"] += 1
        assert model_.config.num_hidden_layers == 6 - 1 - (calls["n"] > 6)
        if calls["n"] == 8:
            raise RuntimeError("trial failed")
        return real(model_, batches)

    monkeypatch.setattr(importance, "calibration_loss", failing)
    with pytest.raises(RuntimeError, match="trial failed"):
        importance.greedy_loss_search(model, _batches(), list(range(6)), 3, layers_removed, progress=False,
                                      reuse_prefix=False)
    assert calls["n"] == 8
    assert model.config.num_hidden_layers == 6 and model.config.layer_types == types
    assert [block.layer_idx for block in decoder_layers(model)] == list(range(6))


def test_iterative_pruning_errors():
    model, _ = tiny_model("tiny-llama")
    with pytest.raises(ValueError, match="leaves only 2 removable"):
        iterative_loss_pruning(model, _batches(), 3, protect_first=1, protect_last=1, progress=False)
    with pytest.raises(ValueError, match="at least one must remain"):
        iterative_loss_pruning(model, _batches(), 4, progress=False)
    with pytest.raises(ValueError, match=">= 1"):
        iterative_loss_pruning(model, _batches(), 0, progress=False)
    with pytest.raises(ValueError, match="empty"):
        iterative_loss_pruning(model, [], 1, progress=False)


def test_baselines():
    model, _ = tiny_model("tiny-qwen3")
    with torch.no_grad():
        for p in decoder_layers(model)[2].parameters():
            p.mul_(0.1)
    scores = weight_magnitude_importance(model)
    block = decoder_layers(model)[0]
    matrices = [p for p in block.parameters() if p.dim() == 2]
    by_hand = sum(p.abs().sum() for p in matrices) / sum(p.numel() for p in matrices)
    assert scores[0].item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert select_by_importance(scores, 1) == [2]
    assert position_importance(model).tolist() == [4.0, 3.0, 2.0, 1.0]
    for n in (1, 2, 3):
        assert select_by_importance(position_importance(model), n) == select_last(model, n)
    with pytest.raises(ValueError, match="at least 1"):
        position_importance(0)


def test_embedded_block_influence_beats_dropping_the_last_blocks(embedded):
    model, tokenizer = embedded
    batches = calibration_batches(tokenizer, n_samples=4, seq_len=64, batch_size=2)
    scores = layer_importance(model, batches, window_blocks=4, progress=False)
    influence = scores["block_influence"]
    assert influence.shape == (30,) and scores["angular_distance"].shape == (27,)
    assert influence.argmax().item() == 0  # the first block turns the embeddings most
    by_influence = remove_layers(model, select_by_importance(influence, 4, protect_first=1, protect_last=1))
    last = remove_layers(model, select_last(model, 4))
    assert calibration_loss(by_influence, batches) < calibration_loss(last, batches) - 1.0
    assert model.config.num_hidden_layers == 30 and count_hooks(model) == 0


def test_greedy_search_minimizes_the_score_it_is_given():
    # a custom score (CH04's benchmark passes a KL to the unchanged model) replaces the calibration loss:
    # here the score prefers trials that hold the highest indices, so the search takes them from the top
    from contextlib import contextmanager

    from utils.importance import greedy_loss_search
    from utils.models import tiny_model

    model = tiny_model("tiny-llama")[0]
    current: list[int] = []

    @contextmanager
    def trial(_, indices):
        current[:] = indices
        yield

    chosen = greedy_loss_search(model, [], [0, 1, 2, 3], 2, trial, progress=False,
                                score=lambda _model, _batches: -float(sum(current)))
    assert chosen == [3, 2]
    with pytest.raises(TypeError, match="score"):
        greedy_loss_search(model, [], [0, 1], 1, trial, progress=False, score="kl")


def _scores_of_every_trial(model, batches, trial, n, reuse_prefix):
    """The score of every trial greedy_loss_search runs, in order, and what it chooses."""
    seen = []

    def score(model_, batches_):
        seen.append(calibration_loss(model_, batches_))
        return seen[-1]

    chosen = importance.greedy_loss_search(model, batches, list(range(len(decoder_layers(model)))), n, trial,
                                           progress=False, score=score, reuse_prefix=reuse_prefix)
    return chosen, seen


@pytest.mark.parametrize("trial_name", ["layers_removed", "attention_skipped"])
def test_greedy_search_reusing_the_prefix_gives_the_same_scores(tiny, trial_name):
    # a trial's pass starts at the candidate's block, fed the input recorded once per step: every score must
    # equal the one of the full pass (the recording passes come first in each step and are left out)
    from utils.bypass import attention_skipped

    name, model, _ = tiny
    trial = {"layers_removed": layers_removed, "attention_skipped": attention_skipped}[trial_name]
    batches = _batches()
    ids = batches[0]["input_ids"].to(model.device)
    logits = model(ids).logits
    full_chosen, full = _scores_of_every_trial(model, batches, trial, 2, reuse_prefix=False)
    reused_chosen, reused = _scores_of_every_trial(model, batches, trial, 2, reuse_prefix=True)
    n_layers = len(decoder_layers(model))
    trials_per_step = [n_layers, n_layers - 1]
    recorded_steps = [reused[0:trials_per_step[0] + 1], reused[trials_per_step[0] + 1:]]
    assert [len(step) for step in recorded_steps] == [t + 1 for t in trials_per_step]
    replayed = recorded_steps[0][1:] + recorded_steps[1][1:]
    assert reused_chosen == full_chosen
    torch.testing.assert_close(torch.tensor(replayed, dtype=torch.float64), torch.tensor(full, dtype=torch.float64),
                               rtol=1e-6, atol=1e-7)
    # the recording pass of step 2 is the model with the first choice applied
    with trial(model, full_chosen[:1]):
        assert recorded_steps[1][0] == pytest.approx(calibration_loss(model, batches), rel=1e-6)
    assert count_hooks(model) == 0 and len(decoder_layers(model)) == n_layers
    assert torch.equal(model(ids).logits, logits)


def test_greedy_search_reusing_the_prefix_restores_the_model_when_a_score_raises():
    model, _ = tiny_model("tiny-gemma3")
    types, calls = list(model.config.layer_types), {"n": 0}

    def failing(model_, batches_):
        calls["n"] += 1
        if calls["n"] == 4:  # inside a replayed pass: the trial's removal and the prefix removal are both active
            assert model_.config.num_hidden_layers < 5
            raise RuntimeError("score failed")
        return calibration_loss(model_, batches_)

    with pytest.raises(RuntimeError, match="score failed"):
        importance.greedy_loss_search(model, _batches(), list(range(6)), 2, layers_removed, progress=False,
                                      score=failing)
    assert model.config.num_hidden_layers == 6 and model.config.layer_types == types
    assert [block.layer_idx for block in decoder_layers(model)] == list(range(6))
    assert count_hooks(model) == 0


def test_greedy_search_reusing_the_prefix_refuses_a_score_that_changes_its_work():
    model, _ = tiny_model("tiny-llama")
    batches, calls = _batches(), {"n": 0}

    def fewer_each_time(model_, batches_):
        calls["n"] += 1
        return calibration_loss(model_, batches_[:1] if calls["n"] > 1 else batches_)

    with pytest.raises(RuntimeError, match="reuse_prefix=False"):
        importance.greedy_loss_search(model, batches, [1, 2], 1, layers_removed, progress=False, score=fewer_each_time)
    with pytest.raises(TypeError, match="reuse_prefix"):
        importance.greedy_loss_search(model, batches, [1, 2], 1, layers_removed, progress=False, reuse_prefix="yes")
    assert count_hooks(model) == 0
