import pytest
import torch

from utils.hooks import POINTS, capture_activations, count_hooks
from utils.models import tiny_model


def test_captures_every_point_with_right_shapes(tiny):
    name, model, tokenizer = tiny
    ids = tokenizer(["a short text", "another one!"], return_tensors="pt", padding=True)
    with capture_activations(model, points=POINTS) as captured:
        model(**{k: v.to(model.device) for k, v in ids.items()})
    n_layers = model.config.num_hidden_layers
    assert len(captured) == n_layers * len(POINTS)
    batch, length = ids["input_ids"].shape
    for (point, layer), tensors in captured.items():
        width = model.config.intermediate_size if point == "mlp_act" else model.config.hidden_size
        assert tensors[0].shape == (batch, length, width), (point, layer)
    assert count_hooks(model) == 0


def test_residual_decomposition_holds_on_llama():
    """In Llama: resid_mid = block_in + attn_out and block_out = resid_mid + mlp_out; block l's output is
    block l+1's input."""
    model, _ = tiny_model("tiny-llama")
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with capture_activations(model, points=POINTS) as c:
        model(ids)
    for layer in range(4):
        torch.testing.assert_close(c["resid_mid", layer][0], c["block_in", layer][0] + c["attn_out", layer][0])
        torch.testing.assert_close(c["block_out", layer][0], c["resid_mid", layer][0] + c["mlp_out", layer][0])
    torch.testing.assert_close(c["block_out", 1][0], c["block_in", 2][0])


def test_callback_streams_without_storing():
    model, _ = tiny_model("tiny-llama")
    seen = []
    with capture_activations(model, layers=[1], points=("mlp_act",), callback=lambda p, l, t: seen.append((p, l, t.shape))) as c:
        model(torch.tensor([[1, 2, 3]]))
        model(torch.tensor([[1, 2, 3, 4]]))
    assert seen == [("mlp_act", 1, (1, 3, 128)), ("mlp_act", 1, (1, 4, 128))]
    assert len(c) == 0


def test_hooks_are_removed_when_the_forward_pass_raises():
    model, _ = tiny_model("tiny-llama")
    with pytest.raises(IndexError):
        with capture_activations(model, points=POINTS):
            model(torch.tensor([[10**6]]))  # token id beyond the vocabulary: the embedding raises
    assert count_hooks(model) == 0


def test_bad_points_and_layers_are_clear_errors():
    model, _ = tiny_model("tiny-llama")
    with pytest.raises(ValueError, match="Unknown capture points"):
        with capture_activations(model, points=("qkv",)):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with capture_activations(model, layers=[7]):
            pass
    assert count_hooks(model) == 0
