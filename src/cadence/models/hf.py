"""Hugging Face Transformers causal LMs behind the interface cadence's own GPT has.

``HFCausalLM`` wraps an ``AutoModelForCausalLM`` so that the rest of cadence sees what it sees
for its GPT: token ids ``[B, T]`` in, float logits ``[B, T, V]`` out, the decoder layers as
``blocks`` (FSDP2 shards one per layer), a KV cache for generation, per-block activation
checkpointing, and names for the parameters whose role matters to an optimizer (the input
embeddings and output head go to AdamW under Muon; only the hidden matrices are orthogonalised).
The wrapper owns no weights of its own: its state dict is the HF model's under the prefix
``hf.``, and :meth:`save_pretrained` writes the HF format back.

transformers is imported lazily: it is only needed when a config names an HF model.
"""

from __future__ import annotations

import fnmatch
import inspect
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cadence.models.packing import segment_mask, segment_positions

__all__ = ["HFCausalLM", "freeze_parameters", "hf_config_from_dict", "load_hf_config"]

PREFIX = "hf."


def _quiet_transformers() -> None:
    # cadence never reaches the network at run time: a name that is not a local folder must
    # fail at once, not retry a download for half a minute (read when huggingface_hub loads).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Its warnings (a default eos id outside a tiny test vocabulary, deprecations) are not
    # the user's to act on; errors still raise.
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()  # "Loading weights" bars: cadence shows its own progress


def load_hf_config(path: str | Path) -> Any:
    """The ``PretrainedConfig`` of a local model directory, never touching the network."""
    from transformers import AutoConfig

    _quiet_transformers()
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def hf_config_from_dict(spec: dict[str, Any], vocab_size: int | None = None) -> Any:
    """``{model_type: llama, hidden_size: 64, ...}`` -> a ``PretrainedConfig``.

    ``vocab_size`` (the tokenizer's) fills in a vocabulary the spec leaves out, and special
    token ids that fall outside the vocabulary (GPT-2's 50256 in a 256-token model) are
    dropped rather than left pointing at rows that do not exist.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    _quiet_transformers()
    kwargs = dict(spec)
    model_type = kwargs.pop("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"unknown model_type {model_type!r}; transformers knows e.g. llama, gpt2, qwen2, "
            "mistral, gpt_neox"
        )
    if vocab_size is not None:
        kwargs.setdefault("vocab_size", vocab_size)
    config = AutoConfig.for_model(model_type, **kwargs)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= config.vocab_size and key not in spec:
            setattr(config, key, None)
    return config


def freeze_parameters(model: nn.Module, patterns: list[str], prefix: str = "") -> int:
    """Set ``requires_grad=False`` on parameters whose name matches a pattern; the count frozen.

    Names are matched without ``prefix`` (the wrapper's ``hf.``), so a user writes the names
    the HF model itself has (``model.embed_tokens.*``). A pattern that matches nothing raises
    ValueError naming it: a typo would otherwise silently train everything.
    """
    frozen = 0
    for pattern in patterns:
        hit = False
        for name, p in model.named_parameters():
            short = name[len(prefix) :] if prefix and name.startswith(prefix) else name
            if fnmatch.fnmatchcase(short, pattern):
                hit = True
                if p.requires_grad:
                    p.requires_grad_(False)
                    frozen += 1
        if not hit:
            raise ValueError(
                f"model.freeze: pattern {pattern!r} matches no parameter; names look like "
                f"{_example_names(model, prefix)}"
            )
    return frozen


def _example_names(model: nn.Module, prefix: str) -> str:
    names = [n[len(prefix) :] if n.startswith(prefix) else n for n, _ in model.named_parameters()]
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


class HFCache:
    """The KV cache of one generation batch: HF's own cache plus which positions are real.

    ``valid`` has the meaning of cadence's ``KVCache.valid`` (left padding is False), so the
    batched decoder drives both models the same way; it becomes HF's attention mask, and the
    position ids count only real tokens, so a padded row decodes as it would alone.
    """

    def __init__(self, batch: int, max_len: int, device: torch.device) -> None:
        self.max_len = max_len
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.kv: Any = None

    def reset(self) -> None:
        self.kv = None


class HFCausalLM(nn.Module):
    """An ``AutoModelForCausalLM`` that takes token ids and returns float logits."""

    def __init__(self, model: nn.Module, seq_len: int | None = None) -> None:
        super().__init__()
        self.hf = model
        self.seq_len = int(seq_len or self.context_length)  # the training window
        params = inspect.signature(type(model).forward).parameters
        # transformers 5 renamed `past_key_values` to `cache`; accept either.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # ------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, path: str | Path, seq_len: int | None = None) -> HFCausalLM:
        """Weights and config from a local directory, in float32 (autocast does bf16)."""
        from transformers import AutoModelForCausalLM

        _quiet_transformers()
        model = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=torch.float32
        )
        return cls(model, seq_len)

    @classmethod
    def from_config(cls, config: Any, seq_len: int | None = None) -> HFCausalLM:
        """A freshly initialised model (the HF model's own init, seeded by torch's RNG)."""
        from transformers import AutoModelForCausalLM

        _quiet_transformers()
        return cls(AutoModelForCausalLM.from_config(config, dtype=torch.float32), seq_len)

    def save_pretrained(self, directory: str | Path) -> None:
        """The HF format: config.json, generation config and model.safetensors."""
        self.hf.save_pretrained(str(directory))

    def save_config(self, run_dir: str | Path) -> None:
        """The model's shape (config.json) under ``run_dir/hf``, to rebuild it offline."""
        out = Path(run_dir) / "hf"
        out.mkdir(parents=True, exist_ok=True)
        self.hf.config.save_pretrained(str(out))

    # ------------------------------------------------------------ shape facts

    @property
    def config(self) -> Any:
        return self.hf.config

    @property
    def vocab_size(self) -> int:
        return int(self.hf.get_input_embeddings().weight.shape[0])

    @staticmethod
    def count_parameters(config: Any) -> int:
        """Parameters of a model of this config, counted on the meta device (no memory)."""
        from transformers import AutoModelForCausalLM

        _quiet_transformers()
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return sum(p.numel() for p in model.parameters())  # tied weights count once

    @staticmethod
    def context_of(config: Any) -> int:
        """Positions a model of this config can attend over (its own limit)."""
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048

    @property
    def context_length(self) -> int:
        """Positions the model can attend over (its own limit, not the training window)."""
        return self.context_of(self.hf.config)

    @property
    def blocks(self) -> list[nn.Module]:
        """The decoder layers, found by the class names HF declares as never to be split
        (``_no_split_modules``, what accelerate's device maps and FSDP auto-wrap use)."""
        names = set(getattr(self.hf, "_no_split_modules", None) or ())
        return [m for m in self.hf.modules() if type(m).__name__ in names]

    # ------------------------------------------------------------ parameter roles

    def _names_of(self, module: nn.Module | None) -> set[str]:
        if module is None:
            return set()
        ids = {id(p) for p in module.parameters()}
        return {n for n, p in self.named_parameters(remove_duplicate=False) if id(p) in ids}

    def output_parameter_names(self) -> set[str]:
        """The LM head (also when it is tied to the input embedding)."""
        return self._names_of(self.hf.get_output_embeddings())

    def embedding_parameter_names(self) -> set[str]:
        """Every embedding table: tokens, and learned positions where the model has them."""
        return {
            f"{name}.weight" if name else "weight"
            for name, m in self.named_modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
        }

    def hidden_matrix_names(self) -> set[str]:
        """The weights of linear maps: nn.Linear's, and GPT-2's Conv1D (a Linear stored
        transposed; orthogonalisation commutes with transposition, so Muon treats it the same).
        ``muon_split`` leaves the embeddings and the head out of them, as for any model."""
        from transformers.pytorch_utils import Conv1D

        return {
            f"{name}.weight"
            for name, m in self.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and m.weight.ndim == 2
        }

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters; with ``exclude_embeddings`` the tables and the head are left out
        (the N of scaling laws and of :meth:`flops_per_token`)."""
        skip = self.embedding_parameter_names() | self.output_parameter_names()
        seen: set[int] = set()
        total = 0
        for name, p in self.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if exclude_embeddings and name in skip:
                continue
            total += p.numel()
        return total

    def flops_per_token(self) -> float:
        """Training FLOPs per token, the estimate cadence's GPT uses: 6*N + 12*L*d*T."""
        c = self.hf.config
        layers = getattr(c, "num_hidden_layers", None) or len(self.blocks)
        width = getattr(c, "hidden_size", None) or getattr(c, "n_embd", 0)
        return float(
            6 * self.num_params(exclude_embeddings=True) + 12 * layers * width * self.seq_len
        )

    # ------------------------------------------------------------ training

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """HF's own per-layer checkpointing, non-reentrant (RNG restored for dropout)."""
        # transformers 5.x renamed gradient_* to activation_checkpointing_*; take either.
        new_api = hasattr(self.hf, "activation_checkpointing_enable")
        if enabled and new_api:
            kwargs = {"use_reentrant": False}
            self.hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif enabled:
            self.hf.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        elif new_api:
            self.hf.activation_checkpointing_disable()
        else:
            self.hf.gradient_checkpointing_disable()

    def forward(
        self,
        idx: torch.Tensor,
        start_pos: int = 0,
        cache: HFCache | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, T, V]`` (float32); with a cache, as cadence's GPT.forward does; with
        ``segments``, sequences packed into a row (see :meth:`_packed`)."""
        if segments is not None:
            if cache is not None:
                raise ValueError("packed segments are for training, not cached decoding")
            return self._packed(idx, segments)
        if cache is None:
            return self.hf(input_ids=idx, use_cache=False).logits.float()
        if start_pos == 0:
            cache.reset()  # the window slid (or a fresh prompt): re-encode from position 0
        end = start_pos + idx.shape[1]
        if end > cache.max_len:
            raise ValueError(
                f"HFCache: positions up to {end} exceed the cache length {cache.max_len}"
            )
        valid = cache.valid[:, :end]
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, start_pos:end]
        out = self.hf(
            input_ids=idx,
            attention_mask=valid.long(),
            position_ids=positions,
            use_cache=True,
            **{self._cache_kw: cache.kv},
        )
        cache.kv = out.past_key_values
        return out.logits.float()

    def _packed(self, idx: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """Positions restart at each packed sequence (``position_ids``). With sdpa or eager
        attention a block-diagonal causal mask keeps each sequence to itself: transformers
        passes a 4D mask through as given (boolean for sdpa, additive for eager). Flash
        attention takes no 4D mask; transformers tells packed sequences apart from the
        restarting ``position_ids`` there instead."""
        positions = segment_positions(segments)
        impl = getattr(self.hf.config, "_attn_implementation", None) or "eager"
        mask = None
        if impl == "sdpa":
            mask = segment_mask(segments)
        elif impl == "eager":
            dtype = self.hf.get_input_embeddings().weight.dtype
            allowed = segment_mask(segments)
            mask = torch.zeros(allowed.shape, dtype=dtype, device=idx.device)
            mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        out = self.hf(input_ids=idx, attention_mask=mask, position_ids=positions, use_cache=False)
        return out.logits.float()

    def new_cache(self, batch: int, max_len: int | None = None) -> HFCache:
        device = self.hf.get_input_embeddings().weight.device
        return HFCache(batch, max_len or self.context_length, device)
