"""A small decoder-only Transformer (GPT) used as the language-model workload.

Design choices, and why:

* Rotary position embeddings (RoPE) instead of learned positions, so that every
  two-dimensional parameter inside the blocks is a "hidden" matrix (good for Muon)
  and the only embedding-like tensors are the token embedding and the head.
* Pre-norm blocks with ``torch.nn.RMSNorm`` (or LayerNorm) for stable training at
  the learning rates the optimizers in this package use.
* Attention goes through ``F.scaled_dot_product_attention`` so fused kernels are
  used where available; the rotary angles are indexed by absolute position
  (``start_pos``) so a KV cache can be bolted on later without changing weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "GPTConfig"]


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


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary q/k."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q = q.view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.proj(y)


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cos, sin))
        x = x + self.drop(self.mlp(self.norm2(x)))
        return x


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
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual projections shrunk by 1/sqrt(2*n_layer)
        so the residual stream's variance does not grow with depth."""
        std = 0.02
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        scaled = std / math.sqrt(2 * self.config.n_layer)
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

    def forward(self, idx: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Logits [B, T, V] for token ids ``idx`` [B, T].

        ``start_pos`` is the absolute position of ``idx[:, 0]``; it only shifts the
        rotary angles, which is what a future KV cache needs.
        """
        if idx.dim() != 2:
            raise ValueError(f"GPT expects token ids of shape [B, T], got {tuple(idx.shape)}")
        _, t = idx.shape
        cos, sin = self._rope(start_pos, t, idx.device)
        x = self.drop(self.tok_emb(idx))
        for block in self.blocks:
            x = block(x, cos, sin)
        x = self.norm_f(x)
        return self.head(x).float()

    def output_parameter_names(self) -> set[str]:
        """Names of the output-layer weights (the head, or the tied embedding).

        Optimizers such as Muon are meant for hidden matrices only; the trainer
        uses this set to route the head to AdamW.
        """
        if self.config.tie_embeddings:
            return {"tok_emb.weight"}
        return {"head.weight"}

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
