"""The token layout an affinity encoder declares (no dependencies).

Every ViT here lays its tokens out as [prefix tokens, patch tokens] with the
patches in row-major order of the (h, w) = (H // p, W // p) grid:

- DINO ViT/16 (`vit.ViT`): [CLS, patches] — 1 prefix token, patch 16;
- DINOv2/14 (`dinov2.Dinov2`): [CLS, registers…, patches] — 1 + R prefix
  tokens (R = `num_register_tokens`, 0 for plain DINOv2), patch 14.

`encoders.patch_affinity` uses the layout to drop the prefix and to place the
encoder's patch grid on the image.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where an encoder's patch tokens are.

    Attributes:
      num_prefix_tokens: tokens before the patches (1 CLS + registers).
      patch_size: side of a square patch in input pixels.
      num_register_tokens: registers among the prefix (after the CLS).
    """

    num_prefix_tokens: int
    patch_size: int
    num_register_tokens: int = 0

    def __post_init__(self):
        if self.patch_size <= 0:
            raise ValueError(f"patch_size={self.patch_size}: must be > 0")
        if not 0 <= self.num_register_tokens < self.num_prefix_tokens:
            raise ValueError(
                f"num_register_tokens={self.num_register_tokens} must lie in "
                f"[0, num_prefix_tokens={self.num_prefix_tokens}) (the CLS "
                "token is a prefix token too)")

    @property
    def patch_start(self) -> int:
        """Index of the first patch token (patches run to the end)."""
        return self.num_prefix_tokens

    def num_tokens(self, grid: tuple[int, int]) -> int:
        """T for a (h, w) patch grid."""
        return self.num_prefix_tokens + grid[0] * grid[1]
