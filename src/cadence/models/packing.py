"""Several sequences packed into one row: where each starts, and who may attend to whom.

``segments`` is a ``[B, T]`` integer tensor, constant along each packed sequence and changing
where the next one begins. Positions restart at every sequence, so a packed conversation sees
the same rotary angles as it would alone, and the mask is causal within a sequence and closed
between them: a row of packed sequences computes what each would alone, in one forward pass.
"""

from __future__ import annotations

import torch

__all__ = ["segment_mask", "segment_positions"]


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """Each token's position within its own sequence, ``[B, T]`` int64."""
    t = segments.shape[1]
    index = torch.arange(t, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """``[B, 1, T, T]`` bool, True where a query may attend to a key: earlier or itself, and
    in the same sequence (scaled_dot_product_attention's boolean ``attn_mask``)."""
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    return (same & causal)[:, None]
