"""``cadence export RUN --format peft``: a ``model.peft`` run's adapters as the folder peft
itself writes, for ``PeftModel.from_pretrained(base, DIR)`` onto the untouched base model.

The folder is peft's: ``adapter_config.json`` is the run's ``LoraConfig`` written by its own
``save_pretrained``, and ``adapter_model.safetensors`` holds the adapter tensors under the names
``PeftModel`` gives them (peft's ``get_peft_model_state_dict``, under ``base_model.model.``, the
prefix a ``PeftModel`` wraps its base in). Before anything is moved into place it is loaded
the way a user would load it, onto a fresh copy of the run's ``model.hf`` folder, and its logits
are compared with the run's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cadence.config import ConfigError
from cadence.deploy.rundir import LoadedRun

__all__ = ["export_peft"]

# PeftModel(base) names the base's modules under this prefix (PeftModel.base_model is the
# LoraModel, whose .model is the base).
_PEFT_PREFIX = "base_model.model."


def export_peft(run: LoadedRun, tmp: Path, inputs: list[torch.Tensor]) -> tuple[list[str], float]:
    """Write the adapter folder into ``tmp``; the largest logit difference after loading it."""
    from peft import LoraConfig, PeftModel, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from cadence.deploy.export_hf import _write_tokenizer
    from cadence.models.adapters import has_adapters
    from cadence.models.hf import HFCausalLM, _quiet_transformers

    cfg = run.config
    if cfg.model.peft.method == "none" or not has_adapters(run.model):
        raise ConfigError(
            "--format peft: writes a run's adapters, and this run trained none (model.peft); "
            "use --format safetensors, onnx or hf"
        )
    if not isinstance(run.model, HFCausalLM) or cfg.model.hf is None:
        raise ConfigError(
            "--format peft: the adapters load onto the Hugging Face model folder the run started "
            "from (model.hf), and this run has none; use --format hf (the adapters merged)"
        )
    base_dir = Path(cfg.model.hf)
    if not (base_dir / "config.json").is_file():
        raise ConfigError(f"--format peft: the run's base model {base_dir} is gone; restore it")
    inner = run.model.hf
    config = next(iter(inner.peft_config.values()))  # the LoraConfig peft injected with
    config = LoraConfig(**{**config.to_dict(), "base_model_name_or_path": str(base_dir.resolve())})
    config.save_pretrained(str(tmp))
    state = get_peft_model_state_dict(inner, adapter_name="default")
    weights = {_PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(weights, str(tmp / "adapter_model.safetensors"))
    files = ["adapter_config.json", "adapter_model.safetensors", *_write_tokenizer(run, tmp)]
    # Loaded as a user would: the untouched base folder, then peft's own loader.
    _quiet_transformers()
    base = AutoModelForCausalLM.from_pretrained(
        str(base_dir), local_files_only=True, dtype=torch.float32
    )
    loaded = PeftModel.from_pretrained(base, str(tmp)).eval()
    run.model.eval()
    with torch.no_grad():
        diff = max(
            float((run.model(x).float() - loaded(input_ids=x).logits.float()).abs().max())
            for x in inputs
        )
    return sorted(set(files)), diff
