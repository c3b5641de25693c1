"""Background base class: colour for rays that leave the scene."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from lift3d.utils.base import BaseModule


class BaseBackground(BaseModule):
    """``forward(dirs [B,H,W,3]) -> rgb [B,H,W,3]``."""

    category = "background"

    @dataclass
    class Config:
        pass

    def forward(self, dirs: Tensor) -> Tensor:
        raise NotImplementedError
