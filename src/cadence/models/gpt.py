"""A small decoder-only Transformer (GPT) used as the language-model workload.

Design choices, and why:

* Rotary position embeddings (RoPE) instead of learned positions, so that every
  two-dimensional parameter inside the blocks is a "hidden" matrix (good for Muon)
  and the only embedding-like tensors are the token embedding and the head.
* Pre-norm blocks with ``torch.nn.RMSNorm`` (or LayerNorm) for stable training at
  the learning rates the optimizers in this package use.
* ``parametrization="mup"`` is the maximal-update parametrization (Yang et al., Tensor
  Programs V) for Adam-like optimizers, relative to a base width ``base_width`` at which it
  is the standard one exactly: hidden matrices start at std/sqrt(m) and step at lr/m
  (:meth:`GPT.lr_multipliers`), attention scores are scaled by 1/head_dim rather than
  1/sqrt(head_dim), and the logits by 1/m, where m = d_model/base_width. Every layer's
  activations then move by the same amount per step at any width, so an LR tuned on a narrow
  model holds for a wide one. Embeddings, norms and the (tied) head keep their LR: the logit
  multiplier is what keeps the head's contribution width-independent.
* Attention goes through ``F.scaled_dot_product_attention`` so fused kernels are
  used where available; the rotary angles are indexed by absolute position
  (``start_pos``), so incremental decoding with a :class:`KVCache` needs no change
  to the weights: new tokens are rotated by their absolute position and attend to
  the cached keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cadence.models.packing import segment_mask, segment_positions

__all__ = ["GPT", "PARAMETRIZATIONS", "GPTConfig", "KVCache"]

PARAMETRIZATIONS: dict[str, str] = {
    "sp": "standard parametrization (model.parametrization: sp, the default): GPT-2 init, "
    "one LR for all matrices.",
    "mup": "maximal update (model.parametrization: mup, model.base_width): the LR tuned at "
    "base_width holds at any model.d_model; Adam-like optimizers only.",
}


@dataclass
class GPTConfig:
    """Hyper-parameters of :class:`GPT`; field names mirror the ``model.*`` config keys."""

    vocab_size: int = 256
    seq_len: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    mlp_ratio: int = 4
    norm: str = "rmsnorm"
    tie_embeddings: bool = True
    dropout: float = 0.0
    rope_base: float = 10000.0
    parametrization: str = "sp"
    base_width: int = 128

    @property
    def width_mult(self) -> float:
        """μP's m = d_model / base_width (1 under the standard parametrization)."""
        return self.d_model / self.base_width if self.parametrization == "mup" else 1.0

    def validate(self) -> None:
        """Fail early with the config key to fix, rather than with a shape error deep inside."""
        for key in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model", "mlp_ratio"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{key}: must be a positive integer, got {value!r}")
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"model.d_model: {self.d_model} is not divisible by model.n_head={self.n_head}; "
                "choose d_model as a multiple of n_head"
            )
        if (self.d_model // self.n_head) % 2 != 0:
            raise ValueError(
                f"model.n_head: head dimension d_model/n_head = {self.d_model // self.n_head} "
                "is odd, but rotary embeddings need an even head dimension; change "
                "model.d_model or model.n_head"
            )
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(
                f"model.norm: unknown norm {self.norm!r}; use 'rmsnorm' or 'layernorm'"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout: must be in [0, 1), got {self.dropout}")
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(
                f"model.parametrization: unknown {self.parametrization!r}; use 'sp' (standard) "
                "or 'mup' (maximal update)"
            )
        if not isinstance(self.base_width, int) or self.base_width < self.n_head:
            raise ValueError(
                f"model.base_width: must be an integer of at least model.n_head="
                f"{self.n_head} (the width μP's LR was tuned at), got {self.base_width!r}"
            )
        if self.rope_base <= 0:
            raise ValueError(f"model.rope_base: must be positive, got {self.rope_base}")


def _make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(dim)
    return nn.LayerNorm(dim)


def rope_angles(
    head_dim: int, positions: torch.Tensor, base: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos/sin tables for the given absolute positions, shape [T, head_dim/2].

    Computed in float32 regardless of the model dtype: low-precision angles
    visibly degrade attention at long positions.
    """
    inv_freq = 1.0 / (
        base
        ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    )
    freqs = torch.outer(positions.to(torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the last dim of ``x`` [B, H, T, D]."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


class KVCache:
    """Preallocated per-layer keys and values, [B, H, max_len, head_dim] each.

    Preallocation (rather than ``torch.cat`` per step) keeps decoding allocation-free.
    ``valid`` marks which cached positions hold real tokens: rows of a batch can be
    left-padded to a common length, and padded positions are never attended to. With
    rotary embeddings only relative positions enter the attention scores, so a padded
    row decodes exactly as it would alone.
    """

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.max_len = max_len
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)

    def update(
        self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` at ``start_pos`` and return everything cached up to them."""
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KVCache: positions up to {end} exceed the cache length {self.max_len}; "
                "slide the window or allocate a longer cache"
            )
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def mask(self, start_pos: int, t: int, device: torch.device) -> torch.Tensor:
        """Boolean attention mask [B, 1, t, start_pos+t]: causal and not padding.

        A query always sees itself, so a padding query never has an all-masked row
        (which would make SDPA return NaN); real queries never see padding keys.
        """
        end = start_pos + t
        q_pos = torch.arange(start_pos, end, device=device)[:, None]
        k_pos = torch.arange(end, device=device)[None, :]
        allowed = (k_pos <= q_pos)[None] & self.valid[:, None, :end]
        allowed |= (k_pos == q_pos)[None]
        return allowed[:, None]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary q/k."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        # μP scales scores by 1/head_dim: q and k become correlated as they train, so their
        # dot product grows like head_dim, not sqrt(head_dim). Written as SP's 1/sqrt(head_dim)
        # divided by sqrt(m) so that at the base width it is SP's scale to the bit.
        self.scale = (
            None
            if cfg.parametrization == "sp"
            else 1.0 / math.sqrt(self.head_dim) / math.sqrt(cfg.width_mult)
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        start_pos: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self._heads(x, cos, sin)
        if cache is None:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=mask is None,
                dropout_p=self.dropout if self.training else 0.0,
                scale=self.scale,
            )
        else:
            k, v = cache.update(layer, start_pos, k, v)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=cache.mask(start_pos, t, x.device), scale=self.scale
            )
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.proj(y)

    def _heads(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (rotated) and v as [batch, head, time, head_dim]."""
        b, t, c = x.shape
        q, k, v = (
            z.view(b, t, self.n_head, self.head_dim).transpose(1, 2)
            for z in self.qkv(x).split(c, dim=2)
        )
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attention_entropy(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *rest: Any
    ) -> torch.Tensor:
        """The entropy (nats) of each of this layer's attention rows, [batch, head, time], for
        forward's arguments (``rest``: cache, layer, start_pos, mask). Fused attention never
        forms the probabilities, so ``train.inspect_every`` asks here, on inspected steps only:
        heads collapsing onto one token show as entropy near 0."""
        t = x.shape[1]
        q, k, _ = self._heads(x, cos, sin)
        scale = self.scale if self.scale is not None else self.head_dim**-0.5
        scores = (q @ k.transpose(-2, -1)).float() * scale
        mask = rest[3] if len(rest) > 3 and rest[3] is not None else None
        allowed = mask if mask is not None else torch.ones(t, t, dtype=torch.bool).tril()
        p = scores.masked_fill(~allowed.to(scores.device), float("-inf")).softmax(-1)
        return -(p * p.clamp_min(1e-30).log()).sum(-1)


class MLPBlock(nn.Module):
    """Position-wise feed-forward network with GELU."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.d_model
        self.fc = nn.Linear(cfg.d_model, hidden, bias=False)
        self.proj = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.norm1 = _make_norm(cfg.norm, cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = _make_norm(cfg.norm, cfg.d_model)
        self.mlp = MLPBlock(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        start_pos: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, cache, layer, start_pos, mask))
        x = x + self.drop(self.mlp(self.norm2(x)))
        return x

    def attention_entropy(self, x: torch.Tensor, *rest: Any) -> torch.Tensor:
        """The attention's row entropies for this block's inputs. Asked of the block, not of
        its attention, because a hook on a module inside a compiled block never runs."""
        return self.attn.attention_entropy(self.norm1(x), *rest)


class GPT(nn.Module):
    """Decoder-only Transformer language model returning next-token logits."""

    def __init__(self, cfg: GPTConfig | None = None) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else GPTConfig()
        cfg.validate()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.norm_f = _make_norm(cfg.norm, cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        head_dim = cfg.d_model // cfg.n_head
        cos, sin = rope_angles(head_dim, torch.arange(cfg.seq_len), cfg.rope_base)
        # Not persistent: they are a pure function of the config, so checkpoints stay lean.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False  # see set_activation_checkpointing
        self.reset_parameters()

    @property
    def context_length(self) -> int:
        """Positions generation keeps in view (the trained window; see models/generate.py)."""
        return self.config.seq_len

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them.

        Memory for activations drops from one set per block to the block inputs alone, for
        about one extra forward per step. torch.utils.checkpoint with ``use_reentrant=False``
        restores the RNG state for the recomputation, so dropout draws the same masks and the
        gradients are those of the plain forward. Training only: evaluation and cached
        generation run as usual.
        """
        self.activation_checkpointing = enabled

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual projections shrunk by 1/sqrt(2*n_layer)
        so the residual stream's variance does not grow with depth. Under μP the hidden
        matrices' std is divided by sqrt(m) (their fan-in grew by m); embeddings keep theirs."""
        std = 0.02
        hidden_std = std / math.sqrt(self.config.width_mult)
        hidden = {id(m) for b in self.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.fc)}
        for module in self.modules():
            if isinstance(module, nn.Linear):
                s = hidden_std if id(module) in hidden else std
                nn.init.normal_(module.weight, mean=0.0, std=s)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        scaled = hidden_std / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=scaled)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=scaled)

    def _rope(self, start_pos: int, t: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        end = start_pos + t
        if end <= self.rope_cos.shape[0]:
            # .float(): a model cast to bf16 casts these buffers too; keep the angles exact-ish.
            return self.rope_cos[start_pos:end].float(), self.rope_sin[start_pos:end].float()
        # Beyond the trained context (e.g. generation with a cache): compute on the fly.
        positions = torch.arange(start_pos, end, device=device)
        return rope_angles(
            self.config.d_model // self.config.n_head, positions, self.config.rope_base
        )

    def forward(
        self,
        idx: torch.Tensor,
        start_pos: int = 0,
        cache: KVCache | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] for token ids ``idx`` [B, T].

        ``start_pos`` is the absolute position of ``idx[:, 0]``; it shifts the rotary
        angles. With a ``cache`` (see :meth:`new_cache`) the keys/values of ``idx`` are
        stored at ``start_pos:start_pos+T`` and the queries attend to everything cached
        before them, so decoding one token costs O(T) instead of re-running the prefix.
        ``segments`` [B, T] marks sequences packed into a row (models/packing.py): each gets
        positions from 0 and attends only to itself, as if it were alone.
        """
        if idx.dim() != 2:
            raise ValueError(f"GPT expects token ids of shape [B, T], got {tuple(idx.shape)}")
        _, t = idx.shape
        mask = None
        if segments is not None:
            if cache is not None:
                raise ValueError("GPT: packed segments are for training, not cached decoding")
            positions = segment_positions(segments)
            # [B, 1, T, D/2]: per row angles, broadcast over the heads
            cos = self.rope_cos[positions].float()[:, None]
            sin = self.rope_sin[positions].float()[:, None]
            mask = segment_mask(segments)
        else:
            cos, sin = self._rope(start_pos, t, idx.device)
        x = self.drop(self.tok_emb(idx))
        recompute = self.activation_checkpointing and self.training and cache is None
        for i, block in enumerate(self.blocks):
            if recompute and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, None, i, 0, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, i, start_pos, mask)
        x = self.norm_f(x)
        logits = self.head(x).float()
        m = self.config.width_mult
        return logits if m == 1.0 else logits / m

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` (default seq_len)."""
        cfg = self.config
        p = self.tok_emb.weight
        return KVCache(
            cfg.n_layer,
            batch,
            cfg.n_head,
            max_len or cfg.seq_len,
            cfg.d_model // cfg.n_head,
            dtype=p.dtype,
            device=p.device,
        )

    def output_parameter_names(self) -> set[str]:
        """Names of the output-layer weights (the head, or the tied embedding).

        Optimizers such as Muon are meant for hidden matrices only; the trainer
        uses this set to route the head to AdamW.
        """
        if self.config.tie_embeddings:
            return {"tok_emb.weight"}
        return {"head.weight"}

    def lr_multipliers(self) -> dict[str, float]:
        """Per-parameter LR factors the optimizer applies (empty under SP).

        μP for Adam-like updates, whose per-entry size does not depend on the gradient's
        scale: a hidden matrix's update is summed over a fan-in m times larger, so it steps at
        lr/m. The registry splits the groups by these factors (optim.registry).
        """
        m = self.config.width_mult
        if m == 1.0:  # SP, or μP at its base width: one LR for all
            return {}
        names = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
        return {
            f"blocks.{i}.{n}.weight": 1.0 / m for i in range(self.config.n_layer) for n in names
        }

    def embedding_parameter_names(self) -> set[str]:
        """Names of the input-embedding weights (also excluded from Muon)."""
        return {"tok_emb.weight"}

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameter count; with ``exclude_embeddings`` the token embedding
        (and an untied head, which is the same kind of lookup-sized matrix) are left
        out, which is the N that scaling laws and FLOP estimates use."""
        seen: set[int] = set()
        total = 0
        skip = {"tok_emb.weight", "head.weight"} if exclude_embeddings else set()
        for name, p in self.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if name in skip:
                continue
            total += p.numel()
        return total

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6*N + 12*L*d*T (PaLM appendix B / nanoGPT).

        6*N counts the forward (2 FLOPs per weight per token) plus backward (4) matmul
        work of the non-embedding weights; 12*L*d*T adds the attention score and
        value matmuls (QK^T and AV, forward and backward) that do not involve
        weights. The causal mask's savings are ignored, as in the usual estimate,
        and the head's matmul is left out with the embeddings.
        """
        cfg = self.config
        n = self.num_params(exclude_embeddings=True)
        return float(6 * n + 12 * cfg.n_layer * cfg.d_model * cfg.seq_len)
