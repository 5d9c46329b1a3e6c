import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meduet.models.lean_linear import GeluMlp, LeanLinear, gelu_linear, lean_linear, norm_linear


def _reference_mlp(mlp: GeluMlp) -> nn.Sequential:
    ref = nn.Sequential(nn.Linear(*mlp.fc1.weight.shape[::-1]), nn.GELU(), nn.Linear(*mlp.fc2.weight.shape[::-1]))
    ref.load_state_dict({"0.weight": mlp.fc1.weight, "0.bias": mlp.fc1.bias,
                         "2.weight": mlp.fc2.weight, "2.bias": mlp.fc2.bias})
    return ref


def _saved_bytes(fn, params: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages, other than ``params``, autograd keeps for backward while ``fn()`` runs."""
    resident = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in resident:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_gradients_are_exact_in_double_precision():
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lean_linear, (x, w, b))
    assert torch.autograd.gradcheck(gelu_linear, (x, w, b))
    assert torch.autograd.gradcheck(lean_linear, (x, w, None))
    norm = nn.LayerNorm(5, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    assert torch.autograd.gradcheck(lambda x, nw, nb, w, b: norm_linear(x, norm, w, b),
                                    (x, norm.weight, norm.bias, w, b))


def test_norm_linear_matches_layer_norm_then_linear():
    torch.manual_seed(0)
    norm, linear = nn.LayerNorm(8, eps=1e-6), nn.Linear(8, 6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 4, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = norm_linear(x, norm, linear.weight, linear.bias)
    grads = torch.autograd.grad(y.square().sum(), [x, norm.weight, norm.bias, linear.weight, linear.bias])
    y_ref = linear(norm(x_ref))
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x_ref, norm.weight, norm.bias, linear.weight, linear.bias])
    torch.testing.assert_close(y, y_ref)
    for mine, theirs in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(mine, theirs)
    with pytest.raises(ValueError, match="does not fit"):
        norm_linear(torch.randn(2, 7), norm, linear.weight)


def test_mlp_matches_linear_gelu_linear_in_fp32():
    torch.manual_seed(0)
    mlp = GeluMlp(dim=8, hidden=32)
    ref = _reference_mlp(mlp)
    x = torch.randn(3, 7, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    torch.testing.assert_close(mlp(x), ref(x_ref))
    mlp(x).square().sum().backward()
    ref(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for mine, theirs in ((mlp.fc1, ref[0]), (mlp.fc2, ref[2])):
        torch.testing.assert_close(mine.weight.grad, theirs.weight.grad)
        torch.testing.assert_close(mine.bias.grad, theirs.bias.grad)


def test_follows_autocast_and_returns_fp32_weight_gradients():
    torch.manual_seed(0)
    mlp = GeluMlp(dim=16, hidden=64)
    ref = _reference_mlp(mlp)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = mlp(x), ref(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    y_ref.float().sum().backward()
    assert mlp.fc1.weight.grad.dtype == torch.float32
    torch.testing.assert_close(mlp.fc1.weight.grad, ref[0].weight.grad, rtol=5e-2, atol=5e-2)


def test_stores_neither_weight_copies_nor_the_gelu_output():
    torch.manual_seed(0)
    mlp = GeluMlp(dim=64, hidden=256)
    ref = _reference_mlp(mlp)
    x = torch.randn(8, 32, 64, requires_grad=True)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            lean = _saved_bytes(lambda: mlp(x), list(mlp.parameters()))
            plain = _saved_bytes(lambda: ref(x), list(ref.parameters()))
        # The lean MLP keeps x (cast) and the hidden layer; the reference also keeps gelu's
        # output and, under autocast, bf16 copies of both weights.
        size = 2 if autocast else 4
        hidden, weights = 8 * 32 * 256 * size, 2 * 64 * 256 * size
        assert lean == (8 * 32 * 64 * size) + hidden
        assert plain - lean == hidden + (weights if autocast else 0)


def test_frozen_weights_get_no_gradient_and_no_grad_mode_works():
    layer = LeanLinear(5, 3)
    layer.requires_grad_(False)
    x = torch.randn(2, 5, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None and x.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("fn", [lean_linear, gelu_linear])
def test_no_bias(fn):
    x = torch.randn(2, 5, requires_grad=True)
    w = torch.randn(3, 5, requires_grad=True)
    fn(x, w).sum().backward()
    assert w.grad.shape == (3, 5)


def test_block_stores_less_than_the_plain_layers_and_computes_the_same():
    from meduet.models.blocks import TransformerBlock

    torch.manual_seed(0)
    block = TransformerBlock(dim=32, num_heads=4)
    x = torch.randn(2, 10, 32, requires_grad=True)

    def plain(x: torch.Tensor) -> torch.Tensor:  # the same block with stock layers
        def linear(t, layer):
            return F.linear(t, layer.weight, layer.bias)

        h = block.norm1(x)
        q, k, v = linear(h, block.attn.qkv).unflatten(-1, (3, 4, 8)).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + linear(attn, block.attn.proj)
        return x + linear(F.gelu(linear(block.norm2(x), block.mlp.fc1)), block.mlp.fc2)

    params = list(block.parameters())
    torch.testing.assert_close(block(x), plain(x), rtol=1e-5, atol=1e-5)
    assert _saved_bytes(lambda: block(x), params) < _saved_bytes(lambda: plain(x), params)
