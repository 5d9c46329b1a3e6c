"""Linear layers that keep less for backward, for the transformer blocks' big matrices.

Under autocast a plain ``nn.Linear`` keeps a low-precision copy of its weight alive for the
whole step (autocast's weight cache, also saved for backward), and ``Linear -> GELU -> Linear``
keeps both the GELU input and its output (each ``4 E`` wide per token). MeDUET's pretraining
runs the encoder on many sequences per step (mixed batch, re-encoded reconstructions), so
these are most of its activation memory. The two functions here compute exactly the same
forward and gradients but:

- ``lean_linear`` saves the fp32 master weight (the parameter itself, no copy) and casts it
  again in backward; only the (cast) input is stored;
- ``gelu_linear`` computes ``linear(gelu(h))`` and stores ``h`` alone: the GELU output is
  recomputed in backward (one elementwise op), so the MLP's hidden layer is stored once;
- ``norm_linear`` computes ``linear(layer_norm(x))`` and stores ``x`` (which a plain LayerNorm
  stores anyway) but not the normalised copy: it is recomputed in backward.

Both follow autocast: inside an autocast region they compute in its dtype (bf16), outside
it in the input's dtype; gradients of the weights come back in the weights' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _matmul_grads(needs: tuple[bool, ...], grad_out: torch.Tensor, inputs: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``y = inputs @ W.T + b`` w.r.t. inputs, ``W`` and ``b`` (``W``, ``b`` in their own
    dtype), each only where ``needs`` (``ctx.needs_input_grad``) asks for it."""
    flat_grad = grad_out.reshape(-1, grad_out.shape[-1])  # (M, out)
    grad_in = grad_out @ weight.to(grad_out.dtype) if needs[0] else None  # (..., in)
    grad_w = (flat_grad.T @ inputs.reshape(-1, inputs.shape[-1])).to(weight.dtype) if needs[1] else None
    grad_b = flat_grad.sum(0, dtype=torch.float32).to(bias.dtype) if bias is not None and needs[2] else None
    return grad_in, grad_w, grad_b


class _LeanLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype):  # noqa: D102
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            y = F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x, weight, bias)
        return y

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, weight, bias = ctx.saved_tensors
        with torch.autocast(grad_out.device.type, enabled=False):
            grad_in, grad_w, grad_b = _matmul_grads(ctx.needs_input_grad, grad_out.to(x.dtype), x, weight, bias)
        return grad_in, grad_w, grad_b, None


class _GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, dtype):  # noqa: D102
        with torch.autocast(h.device.type, enabled=False):
            h = h.to(dtype)
            y = F.linear(F.gelu(h), weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(h, weight, bias)  # not gelu(h): recomputed below
        return y

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        h, weight, bias = ctx.saved_tensors
        with torch.autocast(grad_out.device.type, enabled=False):
            grad_act, grad_w, grad_b = _matmul_grads(ctx.needs_input_grad, grad_out.to(h.dtype), F.gelu(h), weight,
                                                     bias)
            grad_h = torch.ops.aten.gelu_backward(grad_act, h) if grad_act is not None else None
        return grad_h, grad_w, grad_b, None


class _NormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, weight, bias, dtype):  # noqa: D102
        with torch.autocast(x.device.type, enabled=False):
            normed, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps)
            y = F.linear(normed.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x, norm_weight, norm_bias, mean, rstd, weight, bias)
        ctx.eps, ctx.dtype = eps, dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, norm_weight, norm_bias, mean, rstd, weight, bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with torch.autocast(grad_out.device.type, enabled=False):
            normed = torch.native_layer_norm(x, x.shape[-1:], norm_weight, norm_bias, ctx.eps)[0].to(ctx.dtype)
            grad_normed, grad_w, grad_b = _matmul_grads((any(needs[:3]), needs[4], needs[5]),
                                                        grad_out.to(ctx.dtype), normed, weight, bias)
            grad_x = grad_nw = grad_nb = None
            if grad_normed is not None:
                grad_x, grad_nw, grad_nb = torch.ops.aten.native_layer_norm_backward(
                    grad_normed.to(x.dtype), x, x.shape[-1:], mean, rstd, norm_weight, norm_bias,
                    [needs[0], norm_weight is not None and needs[1], norm_bias is not None and needs[2]])
        return grad_x, grad_nw, grad_nb, None, grad_w, grad_b, None


def lean_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` that stores only ``x`` (cast) for backward, never a weight copy.

    Args:
        x: ``(..., in)``; weight: ``(out, in)``; bias: ``(out,)`` or ``None``.

    Returns:
        ``(..., out)`` in the autocast dtype inside an autocast region, else in ``x``'s dtype.
    """
    return _LeanLinear.apply(x, weight, bias, _compute_dtype(x))


def gelu_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(F.gelu(h), weight, bias)`` (exact erf GELU) storing ``h`` but not ``gelu(h)``.

    Args:
        h: ``(..., in)`` pre-activations; weight: ``(out, in)``; bias: ``(out,)`` or ``None``.

    Returns:
        ``(..., out)``, dtype as in ``lean_linear``.
    """
    return _GeluLinear.apply(h, weight, bias, _compute_dtype(h))


def norm_linear(x: torch.Tensor, norm: nn.LayerNorm, weight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(norm(x), weight, bias)`` storing ``x`` but not ``norm(x)``.

    The layer norm runs in ``x``'s dtype (fp32 under autocast, as autocast would run it);
    the product in the autocast dtype.

    Args:
        x: ``(..., in)``; norm: a ``LayerNorm`` over the last dimension (its parameters are used);
        weight: ``(out, in)``; bias: ``(out,)`` or ``None``.

    Returns:
        ``(..., out)``, dtype as in ``lean_linear``.
    """
    if tuple(norm.normalized_shape) != tuple(x.shape[-1:]):
        raise ValueError(f"norm over {tuple(norm.normalized_shape)} does not fit inputs {tuple(x.shape)}")
    return _NormLinear.apply(x, norm.weight, norm.bias, norm.eps, weight, bias, _compute_dtype(x))


class LeanLinear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose forward is ``lean_linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return lean_linear(x, self.weight, self.bias)


class GeluMlp(nn.Module):
    """``fc2(gelu(fc1(norm(x))))`` with the hidden layer stored once for backward.

    Args:
        dim: input and output width.
        hidden: hidden width.
    """

    def __init__(self, *, dim: int, hidden: int) -> None:
        super().__init__()
        # Parameter holders: forward applies them through norm_linear and gelu_linear.
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, norm: nn.LayerNorm | None = None) -> torch.Tensor:
        """``(..., dim)`` -> ``(..., dim)``; ``norm`` (the block's pre-norm) is fused into ``fc1``."""
        h = lean_linear(x, self.fc1.weight, self.fc1.bias) if norm is None else norm_linear(
            x, norm, self.fc1.weight, self.fc1.bias)
        return gelu_linear(h, self.fc2.weight, self.fc2.bias)
