import math
import copy

import pytest
import torch

from utils.data import calibration_batches
from utils.batches import check_disjoint, to_device
from utils.distill import (default_layer_map, distill, distillation_loss, distillation_metrics, hidden_state_loss,
                           kd_loss, next_token_loss)
from utils.training import TrainingHistory
from utils.models import model_device, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _drop_layers(model, drop):
    """A depth-pruned copy: blocks `drop` removed, config and each attention's layer_idx kept in sync."""
    student = copy.deepcopy(model)
    kept = [layer for i, layer in enumerate(student.model.layers) if i not in drop]
    student.model.layers = torch.nn.ModuleList(kept)
    student.config.num_hidden_layers = len(kept)
    if getattr(student.config, "layer_types", None) is not None:
        student.config.layer_types = [t for i, t in enumerate(student.config.layer_types) if i not in drop]
    for index, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = index
    return student


def _random_batch(rows=2, length=12, seed=0):
    ids = torch.randint(0, 256, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _outputs(model, batch, hidden=True):
    """The model's outputs on `batch`, moved to the model's device first (the GPU lane puts `tiny` models on CUDA)."""
    return model(**to_device(batch, model_device(model)), output_hidden_states=hidden, use_cache=False)


@pytest.fixture(scope="module")
def teacher():
    return tiny_model("tiny-llama", seed=0)[0]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_model("tiny-llama")[1]


def test_each_loss_term_alone_carries_gradient_to_the_student(teacher):
    student = _drop_layers(teacher, [1, 2])
    torch.nn.init.normal_(student.model.layers[1].mlp.down_proj.weight, std=0.05)  # differ from the teacher
    batch = _random_batch()
    layer_map = default_layer_map([0, 3], 4)
    for weights in ({"ce_weight": 1.0, "kd_weight": 0.0}, {"ce_weight": 0.0, "kd_weight": 1.0},
                    {"ce_weight": 0.0, "kd_weight": 0.0, "hidden_weight": 1.0}):
        student.zero_grad(set_to_none=True)
        s, t = _outputs(student, batch), _outputs(teacher, batch)
        terms = distillation_loss(s.logits, t.logits.detach(), batch["input_ids"], batch["attention_mask"],
                                  temperature=2.0, student_hidden_states=s.hidden_states,
                                  teacher_hidden_states=[h.detach() for h in t.hidden_states],
                                  layer_map=layer_map, **weights)
        assert terms["loss"].item() > 0
        terms["loss"].backward()
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        assert grads, weights
        assert all(torch.isfinite(g).all() for g in grads), weights
        assert sum(g.abs().sum() for g in grads) > 0, weights
        assert student.model.embed_tokens.weight.grad.abs().sum() > 0, weights
        assert all(p.grad is None for p in teacher.parameters())


def test_kl_is_zero_for_identical_models_and_positive_otherwise(teacher):
    batch = _random_batch()
    same = copy.deepcopy(teacher)
    s, t = _outputs(same, batch), _outputs(teacher, batch)
    assert kd_loss(s.logits, t.logits, batch["attention_mask"], temperature=2.0).item() == pytest.approx(0, abs=1e-7)
    layer_map = default_layer_map(4, 4)
    assert hidden_state_loss(s.hidden_states, t.hidden_states, layer_map).item() == pytest.approx(0, abs=1e-6)
    other = tiny_model("tiny-llama", seed=1)[0]
    o = _outputs(other, batch)
    assert kd_loss(o.logits, t.logits, batch["attention_mask"], temperature=2.0).item() > 1e-6
    assert hidden_state_loss(o.hidden_states, t.hidden_states, layer_map).item() > 0.1


def test_temperature_scaling_has_the_t_squared_factor():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=generator)
    teacher = torch.randn(2, 5, 11, generator=generator)
    reference = kd_loss(student, teacher, temperature=1.0)
    for temperature in (0.5, 2.0, 4.0):
        # logits scaled by T and softened by T give the same distributions, so only the T^2 factor remains
        scaled = kd_loss(student * temperature, teacher * temperature, temperature=temperature)
        assert scaled.item() == pytest.approx(temperature ** 2 * reference.item(), rel=1e-5)
    manual = torch.nn.functional.kl_div(torch.log_softmax(student / 3, -1), torch.softmax(teacher / 3, -1),
                                        reduction="none").sum(-1).mean() * 9
    assert kd_loss(student, teacher, temperature=3.0).item() == pytest.approx(manual.item(), rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(student, teacher, temperature=0)


def test_padding_is_masked(teacher):
    student = tiny_model("tiny-llama", seed=1)[0]
    layer_map = {1: 1, 4: 4}
    pad = 258

    def terms(batch):
        s, t = _outputs(student, batch), _outputs(teacher, batch)
        return distillation_loss(s.logits, t.logits, batch["input_ids"], batch["attention_mask"], temperature=2.0,
                                 hidden_weight=1.0, student_hidden_states=s.hidden_states,
                                 teacher_hidden_states=t.hidden_states, layer_map=layer_map)

    batch = _random_batch(rows=2, length=10)
    # right-padding every row with 5 padding columns, and adding a row that is only padding ...
    ids = torch.full((3, 15), pad)
    mask = torch.zeros_like(ids)
    ids[:2, :10], mask[:2, :10] = batch["input_ids"], 1
    padded = {"input_ids": ids, "attention_mask": mask}
    base, extended = terms(batch), terms(padded)
    for name in ("ce", "kd", "hidden"):
        assert extended[name].item() == pytest.approx(base[name].item(), rel=1e-4), name
    # ... and a short row counts by its real tokens only: the batch loss is the token-weighted average
    short = {"input_ids": ids[:1, :4].clone(), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    ids2, mask2 = ids[:2, :10].clone(), torch.ones(2, 10, dtype=torch.long)
    ids2[1, 4:], mask2[1, 4:] = pad, 0
    ids2[1, :4] = short["input_ids"][0]
    mixed, full_row, short_row = terms({"input_ids": ids2, "attention_mask": mask2}), terms(
        {"input_ids": ids[:1, :10], "attention_mask": torch.ones(1, 10, dtype=torch.long)}), terms(short)
    assert mixed["kd"].item() == pytest.approx((10 * full_row["kd"] + 4 * short_row["kd"]).item() / 14, rel=1e-4)
    assert mixed["ce"].item() == pytest.approx((9 * full_row["ce"] + 3 * short_row["ce"]).item() / 12, rel=1e-4)
    # labels of -100 are ignored like padding
    labels = batch["input_ids"].clone()
    labels[:, 5:] = -100
    logits = _outputs(student, batch, hidden=False).logits
    cut = {"input_ids": batch["input_ids"][:, :5]}
    assert next_token_loss(logits, labels).item() == pytest.approx(
        next_token_loss(_outputs(student, cut, hidden=False).logits, cut["input_ids"]).item(), rel=1e-4)


def test_unmasked_batches_skip_the_gather_and_give_the_same_loss_and_gradients():
    """Without padding the losses read the logits as they are (no gather of vocabulary-wide rows): the
    values and gradients must be those of the gathered rows, exactly; with padding, the gather is used."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(3, 7, 50, generator=generator)
    teacher = torch.randn(3, 7, 50, generator=generator)
    labels = torch.randint(0, 50, (3, 7), generator=generator)

    def gathered(logits, mask):  # the reference: the selected rows by boolean indexing
        kd_rows, ce_rows = logits[mask] / 2.0, logits[:, :-1][mask[:, 1:] & mask[:, :-1]]
        kl = torch.nn.functional.kl_div(torch.log_softmax(kd_rows, -1), torch.log_softmax(teacher[mask] / 2.0, -1),
                                        log_target=True, reduction="none").sum(-1).mean() * 4.0
        ce = torch.nn.functional.cross_entropy(ce_rows, labels[:, 1:][mask[:, 1:] & mask[:, :-1]])
        return kl, ce

    for mask in (torch.ones(3, 7, dtype=torch.long), torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [0] * 7])):
        ours, reference = student.clone().requires_grad_(), student.clone().requires_grad_()
        kl, ce = kd_loss(ours, teacher, mask, temperature=2.0), next_token_loss(ours, labels, mask)
        kl_ref, ce_ref = gathered(reference, mask.bool())
        (kl + ce).backward()
        (kl_ref + ce_ref).backward()
        if bool(mask.all()):
            assert torch.equal(kl, kl_ref) and torch.equal(ce, ce_ref) and torch.equal(ours.grad, reference.grad)
        else:
            assert torch.allclose(kl, kl_ref) and torch.allclose(ce, ce_ref)
            assert torch.allclose(ours.grad, reference.grad)
            assert ours.grad[2].abs().sum() == 0  # the padding-only row gets no gradient
    # nothing scored at all: a zero that still belongs to the graph
    empty = torch.zeros(3, 7, dtype=torch.long)
    assert kd_loss(student, teacher, empty).item() == 0.0 and next_token_loss(student, labels, empty).item() == 0.0


def test_vocabulary_mismatch_is_a_clear_error(teacher):
    other = tiny_model("tiny-llama", vocab_size=400)[0]
    batch = _random_batch()
    s, t = _outputs(other, batch, hidden=False), _outputs(teacher, batch, hidden=False)
    with pytest.raises(ValueError, match="400.*320"):
        distillation_loss(s.logits, t.logits, batch["input_ids"])
    with pytest.raises(ValueError, match="student config.vocab_size 400, teacher config.vocab_size 320"):
        distill(other, teacher, [batch], steps=1, progress=False)


def test_layer_maps_and_their_errors(teacher):
    assert default_layer_map([0, 1, 4, 5], 6) == {1: 1, 2: 2, 3: 5, 4: 6}
    assert default_layer_map([0, 2], 6) == {1: 1, 2: 6}  # final states are both after the final norm
    assert default_layer_map(2, 4) == {1: 2, 2: 4}
    assert default_layer_map(4, 4) == {1: 1, 2: 2, 3: 3, 4: 4}
    with pytest.raises(ValueError, match="out of range.*0..3"):
        default_layer_map([0, 4], 4)
    with pytest.raises(ValueError, match="strictly increasing"):
        default_layer_map([2, 1], 4)
    with pytest.raises(ValueError, match="empty"):
        default_layer_map([], 4)
    student = _drop_layers(teacher, [1, 2])
    batch = _random_batch()
    with pytest.raises(ValueError, match=r"\{3: 3\}.*student hidden-state indices must be in 0..2"):
        distill(student, teacher, [batch], steps=1, hidden_weight=1.0, layer_map={1: 1, 3: 3}, progress=False)
    with pytest.raises(ValueError, match=r"\{2: 9\}.*teacher ones in 0..4"):
        distill(student, teacher, [batch], steps=1, hidden_weight=1.0, layer_map={2: 9}, progress=False)
    narrow = tiny_model("tiny-llama", hidden_size=32, num_hidden_layers=2)[0]
    with pytest.raises(ValueError, match="equal hidden sizes.*32.*64"):
        distill(narrow, teacher, [batch], steps=1, hidden_weight=1.0, progress=False)
    s, t = _outputs(narrow, batch), _outputs(teacher, batch)
    with pytest.raises(ValueError, match="equal hidden sizes"):
        hidden_state_loss(s.hidden_states, t.hidden_states, {1: 1})
    with pytest.raises(ValueError, match="needs student_hidden_states"):
        distillation_loss(s.logits, t.logits, batch["input_ids"], hidden_weight=1.0)


def test_argument_and_batch_errors(teacher):
    student = _drop_layers(teacher, [1, 2])
    batch = _random_batch()
    with pytest.raises(ValueError, match="steps.*>= 1"):
        distill(student, teacher, [batch], steps=0, progress=False)
    with pytest.raises(ValueError, match="train_batches is empty"):
        distill(student, teacher, [], steps=1, progress=False)
    with pytest.raises(ValueError, match="single dict"):
        distill(student, teacher, batch, steps=1, progress=False)
    with pytest.raises(ValueError, match="warmup_steps"):
        distill(student, teacher, [batch], steps=2, warmup_steps=3, progress=False)
    with pytest.raises(ValueError, match="grad_accum"):
        distill(student, teacher, [batch], steps=1, grad_accum=0, progress=False)
    with pytest.raises(ValueError, match="weights are 0"):
        distill(student, teacher, [batch], steps=1, ce_weight=0, kd_weight=0, progress=False)
    with pytest.raises(ValueError, match="evaluation rows also appear in the training"):
        distill(student, teacher, [batch], steps=1, eval_batches=[_random_batch(), _random_batch(seed=1)],
                progress=False)
    check_disjoint([batch], [_random_batch(seed=1)])  # disjoint: no error
    with pytest.raises(ValueError, match="shares parameter"):
        shallow = copy.copy(teacher)
        distill(shallow, teacher, [batch], steps=1, progress=False)
    with pytest.raises(ValueError, match="teacher itself"):
        distill(teacher, teacher, [batch], steps=1, progress=False)


def test_short_distillation_lowers_kd_loss_and_leaves_the_teacher_unchanged(teacher, tokenizer):
    train = calibration_batches(tokenizer, "news", n_samples=8, seq_len=32, batch_size=4, split="train")
    held_out = calibration_batches(tokenizer, "news", n_samples=4, seq_len=32, batch_size=4, split="validation")
    student = _drop_layers(teacher, [1, 2])
    before_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    start = distillation_metrics(student, teacher, train)["kd"]
    calls = []

    def eval_fn(model):
        calls.append(model.training)
        return distillation_metrics(model, teacher, held_out)["ce"]

    history = distill(student, teacher, train, steps=12, lr=3e-3, warmup_steps=2, ce_weight=0.0, kd_weight=1.0,
                      hidden_weight=0.1, layer_map=default_layer_map([0, 3], 4), eval_fn=eval_fn,
                      eval_batches=held_out, eval_every=5, progress=False)
    end = distillation_metrics(student, teacher, train)["kd"]
    assert end < 0.5 * start  # ce_weight=0: the random teacher's text model is no target worth learning
    assert isinstance(history, TrainingHistory)
    assert [row["step"] for row in history.train] == list(range(1, 13))
    assert {"loss", "ce", "kd", "hidden", "lr", "grad_norm", "tokens", "elapsed_s"} <= set(history.train[0])
    assert [row["step"] for row in history.eval] == [0, 5, 10, 12]
    assert calls == [False] * 4  # the student is evaluated in eval mode
    assert all("eval" in row and "eval_kd" in row and "eval_ppl" in row for row in history.eval)
    assert history.eval[-1]["eval_kd"] < history.eval[0]["eval_kd"]
    assert history.column("elapsed_s") == sorted(history.column("elapsed_s"))
    assert not student.training and not teacher.training
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before_teacher[name]), name
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in student.parameters())


def test_schedule_warms_up_then_decays(teacher):
    student = _drop_layers(teacher, [1, 2])
    history = distill(student, teacher, [_random_batch()], steps=10, lr=1e-3, warmup_steps=4, progress=True)
    lrs = history.column("lr")
    assert lrs[:5] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert all(b < a for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] < 0.1 * 1e-3


def test_grad_accumulation_matches_one_big_batch_and_counts_steps(teacher):
    big = _random_batch(rows=4, length=12, seed=3)
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]
    one = _drop_layers(teacher, [1, 2])
    two = _drop_layers(teacher, [1, 2])
    settings = dict(steps=1, lr=1e-3, temperature=2.0, max_grad_norm=0.5, progress=False)
    h_one = distill(one, teacher, [big], **settings)
    h_two = distill(two, teacher, halves, grad_accum=2, **settings)
    assert h_two.train[0]["loss"] == pytest.approx(h_one.train[0]["loss"], rel=1e-5)
    assert h_two.train[0]["grad_norm"] == pytest.approx(h_one.train[0]["grad_norm"], rel=1e-4)
    for (name, a), b in zip(one.named_parameters(), two.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    # three steps of two accumulated batches consume six batches of 2 x 12 tokens
    history = distill(_drop_layers(teacher, [1, 2]), teacher, halves, steps=3, grad_accum=2, progress=False)
    assert len(history.train) == 3
    assert history.column("tokens") == [48, 96, 144]


def test_train_only_blocks_from_freezes_the_prefix_and_embeddings():
    from utils.distill import train_only_blocks_from

    model, _ = tiny_model("tiny-llama")
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    trainable = train_only_blocks_from(model, 2)
    assert trainable == 2 * block + model.model.norm.weight.numel()
    assert not model.model.embed_tokens.weight.requires_grad
    assert all(not p.requires_grad for p in model.model.layers[1].parameters())
    assert all(p.requires_grad for p in model.model.layers[2].parameters())
    assert train_only_blocks_from(model, 0, train_embeddings=True) == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="first_block must be in 0..3"):
        train_only_blocks_from(model, 4)


def test_accelerate_path_matches_the_plain_loop(teacher):
    # One process on the CPU: the accelerate path (the one `accelerate launch` uses on several GPUs) must
    # train exactly like the plain loop, step for step.
    from accelerate import Accelerator

    batches = [_random_batch(seed=s) for s in range(3)]
    plain, accelerated = _drop_layers(teacher, [1]), _drop_layers(teacher, [1])
    distill(plain, teacher, batches, steps=3, lr=1e-3, grad_accum=2, progress=False)
    history = distill(accelerated, teacher, batches, steps=3, lr=1e-3, grad_accum=2, progress=False,
                      accelerator=Accelerator(cpu=True))
    assert len(history.train) == 3
    for (name, a), b in zip(plain.state_dict().items(), accelerated.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    changed = any(not torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                          _drop_layers(teacher, [1]).state_dict().values()))
    assert changed


def test_train_only_blocks_from_with_last_block_trains_only_that_span():
    from utils.distill import train_only_blocks_from

    model, _ = tiny_model("tiny-llama")
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    assert train_only_blocks_from(model, 1, last_block=2) == 2 * block
    assert [all(p.requires_grad for p in layer.parameters()) for layer in model.model.layers] == [False, True, True, False]
    assert not model.model.norm.weight.requires_grad and not model.lm_head.weight.requires_grad
    # back to the default: from block 1 to the end, final norm included
    assert train_only_blocks_from(model, 1) == 3 * block + model.model.norm.weight.numel()
    with pytest.raises(ValueError, match="last_block must be None .* in first_block..3"):
        train_only_blocks_from(model, 2, last_block=1)
    with pytest.raises(ValueError, match="last_block"):
        train_only_blocks_from(model, 0, last_block=4)


def test_cut_layer_map_points_at_the_first_block_after_each_cut():
    from utils.distill import cut_layer_map

    # 30 blocks, 12..17 removed: student block 12 is teacher block 18 (hidden-state indices 13 and 19)
    assert cut_layer_map(range(12, 18), 30) == {13: 19}
    assert cut_layer_map([1, 2, 5], 8) == {2: 4, 4: 7}
    assert cut_layer_map([6, 7], 8) == {6: 8}  # a cut at the end: both final states
    with pytest.raises(ValueError, match="removed is empty"):
        cut_layer_map([], 4)
    with pytest.raises(ValueError, match="distinct block indices in 0..3"):
        cut_layer_map([1, 1], 4)
    with pytest.raises(ValueError, match="distinct block indices in 0..3"):
        cut_layer_map([4], 4)
    with pytest.raises(ValueError, match="keep at least one"):
        cut_layer_map([0, 1, 2, 3], 4)


def test_cut_layer_map_on_every_tiny_family(tiny):
    # The state the map names is the first one where the student differs from the teacher: the one before
    # it is identical (same blocks, same input), and training on the map's hidden term runs and is finite.
    from utils.depth import remove_layers
    from utils.distill import cut_layer_map

    name, model, _ = tiny
    n = model.config.num_hidden_layers
    removed = [1, 2]
    layer_map = cut_layer_map(removed, n)
    student = remove_layers(model, removed)
    batch = _random_batch()
    with torch.no_grad():
        s_states, t_states = _outputs(student, batch).hidden_states, _outputs(model, batch).hidden_states
    (s, t), = layer_map.items()
    assert (s, t) == (2, 4)
    torch.testing.assert_close(s_states[s - 1], t_states[1])  # the input of the first block after the cut
    assert hidden_state_loss(s_states, t_states, layer_map) > 0
    history = distill(student, model, [batch], steps=2, lr=1e-3, hidden_weight=1.0, layer_map=layer_map,
                      progress=False)
    assert all(math.isfinite(row["hidden"]) for row in history.train)


def test_teacher_cache_gives_the_same_training_and_skips_the_teachers_blocks(tiny):
    # A second distillation from the same teacher on the same batches, with the cache the first one filled,
    # trains the student to exactly the weights it gets without any cache, while the teacher's blocks run
    # only during the first (the cache holds the final state and the mapped state of each batch).
    from utils.depth import remove_layers
    from utils.distill import cut_layer_map, logits_from_final_state
    from utils.models import decoder_layers

    name, teacher, _ = tiny
    batches = [_random_batch(seed=s) for s in range(3)]
    with torch.no_grad():
        out = _outputs(teacher, batches[0])
        assert torch.equal(logits_from_final_state(teacher, out.hidden_states[-1]), out.logits), name
    removed = [1, 2]
    layer_map = cut_layer_map(removed, teacher.config.num_hidden_layers)
    settings = dict(steps=4, lr=1e-3, hidden_weight=1.0, layer_map=layer_map, progress=False, seed=0)
    plain = remove_layers(teacher, removed)
    distill(plain, teacher, batches, **settings)
    cache = {}
    distill(remove_layers(teacher, removed), teacher, batches, teacher_cache=cache, **settings)  # fills the cache
    cached = remove_layers(teacher, removed)  # built before the hook below (a copy would carry the hook along)
    calls = []
    handle = decoder_layers(teacher)[0].register_forward_hook(lambda *args: calls.append(1))
    try:
        distill(cached, teacher, batches, teacher_cache=cache, **settings)
    finally:
        handle.remove()
    assert calls == [], "the teacher's blocks ran although every batch was in the cache"
    for (key, a), b in zip(plain.state_dict().items(), cached.state_dict().values()):
        assert torch.equal(a, b), (name, key)


def test_teacher_cache_refuses_another_teacher_and_a_wrong_kind(teacher):
    from utils.depth import remove_layers

    batches = [_random_batch()]
    cache = {}
    distill(remove_layers(teacher, [1]), teacher, batches, steps=1, progress=False, teacher_cache=cache)
    other = tiny_model("tiny-llama", seed=1)[0]
    with pytest.raises(ValueError, match="another teacher"):
        distill(remove_layers(other, [1]), other, batches, steps=1, progress=False, teacher_cache=cache)
    with pytest.raises(ValueError, match="precision"):  # the same teacher run in another precision
        distill(remove_layers(teacher, [1]), teacher, batches, steps=1, progress=False, teacher_cache=cache,
                mixed_precision="bf16")
    with pytest.raises(TypeError, match="teacher_cache"):
        distill(remove_layers(teacher, [1]), teacher, batches, steps=1, progress=False, teacher_cache=[])
