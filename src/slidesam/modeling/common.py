"""Small blocks shared by the encoder and decoder, named as in the official SAM code.

We write the SAM building blocks ourselves: the ``segment-anything`` package on PyPI imports
torchvision at import time, and there is no CPU build of torchvision on our machines. Module and
parameter names follow the official code exactly so official checkpoints load by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "LayerNorm2d", "MLPBlock", "linear"]

# oneDNN's fused linear(+activation) reaches the machine's fp32 matmul peak on CPU where the
# default GEMM path gets ~85 %, and fuses the activation pass. It is a private op without an
# autograd kernel, so ``linear`` uses it only for CPU fp32 work with autograd off (inference),
# and falls back to the plain modules everywhere else. Results equal F.linear to fp32 rounding.
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_linear_pointwise"
)
_ACTIVATIONS = {"none": lambda y: y, "gelu": F.gelu, "relu": F.relu}


def linear(layer: nn.Linear, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
    """``activation(layer(x))`` for an ``nn.Linear`` (or a merged LoRA one); ``activation`` is
    ``"none"``, ``"gelu"`` (exact, erf) or ``"relu"``."""
    plain = type(layer) is nn.Linear or getattr(layer, "merged", False)
    if (
        _ONEDNN_LINEAR
        and plain
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and layer.weight.dtype == torch.float32
    ):
        algorithm = "none" if activation == "gelu" else ""
        return torch.ops.mkldnn._linear_pointwise(
            x, layer.weight, layer.bias, activation, [], algorithm
        )
    return _ACTIVATIONS[activation](layer(x))


class MLPBlock(nn.Module):
    """Transformer feed-forward: ``lin2(act(lin1(x)))`` on the last axis."""

    def __init__(self, *, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU):
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.act, nn.ReLU):
            name = "relu"
        elif isinstance(self.act, nn.GELU) and self.act.approximate == "none":
            name = "gelu"
        else:
            return self.lin2(self.act(self.lin1(x)))
        return linear(self.lin2, linear(self.lin1, x, name))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor (any number of spatial axes:
    ``LayerNorm3d`` of the 3D SAM is this module)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        shape = (-1,) + (1,) * (x.dim() - 2)
        return self.weight.view(shape) * x + self.bias.view(shape)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (SAM's decoder heads)."""

    def __init__(
        self,
        *,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
    ):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.num_layers = num_layers
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, outs, strict=True))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = torch.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x
