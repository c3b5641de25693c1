"""Small MLPs for implicit fields (density, features, normals) with an optional tiny-cuda-nn twin.

The torch ``VanillaMLP`` follows tiny-cuda-nn's ``FullyFusedMLP`` semantics (hidden layers of equal
width, no biases, ReLU) so configs move between the two; tiny-cuda-nn is used only when
``backend`` allows it and a CUDA device is present (``lift3d.backends.tcnn_backend``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

MLP_KEYS = {"otype", "activation", "output_activation", "n_neurons", "n_hidden_layers", "bias"}


def get_activation(name: str | None):
    """An activation by (case-insensitive) name: none, relu, sigmoid, tanh, softplus, exp, ..."""
    key = "none" if name is None else str(name).lower()
    table = {
        "none": lambda x: x,
        "relu": F.relu,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "softplus": F.softplus,
        "exp": torch.exp,
        "silu": F.silu,
    }
    if key not in table:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(sorted(table))}")
    return table[key]


class VanillaMLP(nn.Module):
    """``dim_in -> [n_neurons] * n_hidden_layers -> dim_out`` with a hidden activation in between."""

    def __init__(self, dim_in: int, dim_out: int, n_neurons: int = 64, n_hidden_layers: int = 1,
                 activation: str = "ReLU", output_activation: str | None = "None", bias: bool = False) -> None:
        super().__init__()
        dims = [dim_in] + [n_neurons] * n_hidden_layers + [dim_out]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(dims[:-1], dims[1:]))
        self.activation = get_activation(activation)
        self.output_activation = get_activation(output_activation)
        self.n_output_dims = dim_out

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.output_activation(self.layers[-1](x))


def get_mlp(dim_in: int, dim_out: int, config: dict, backend: str = "auto") -> nn.Module:
    """An MLP from a threestudio / tiny-cuda-nn style dict.

    Keys: ``otype`` (``VanillaMLP`` or ``FullyFusedMLP``; both give the torch MLP unless tcnn is
    used), ``activation``, ``output_activation``, ``n_neurons``, ``n_hidden_layers``, ``bias``
    (torch only). ``backend``: ``"auto"`` (tcnn when usable and no bias is asked for) | ``"torch"`` | ``"tcnn"``.
    """
    config = dict(config)
    extra = sorted(set(config) - MLP_KEYS)
    if extra:
        raise ValueError(f"unknown MLP config key(s) {extra}; valid keys: {sorted(MLP_KEYS)}")
    otype = config.get("otype", "VanillaMLP")
    if otype not in ("VanillaMLP", "FullyFusedMLP", "CutlassMLP"):
        raise ValueError(f"unknown MLP otype {otype!r}; valid: VanillaMLP, FullyFusedMLP, CutlassMLP")
    if backend not in ("auto", "torch", "tcnn"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'tcnn', got {backend!r}")
    from lift3d.backends import tcnn_backend

    if backend == "tcnn" or (backend == "auto" and tcnn_backend.available() and not config.get("bias")):
        return tcnn_backend.make_network(dim_in, dim_out, config)
    return VanillaMLP(
        dim_in,
        dim_out,
        n_neurons=int(config.get("n_neurons", 64)),
        n_hidden_layers=int(config.get("n_hidden_layers", 1)),
        activation=config.get("activation", "ReLU"),
        output_activation=config.get("output_activation", "None"),
        bias=bool(config.get("bias", False)),
    )


__all__ = ["VanillaMLP", "get_mlp", "get_activation"]
