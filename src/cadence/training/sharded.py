"""Sharded checkpoints of FSDP2 runs, written and read by torch.distributed.checkpoint (DCP).

Each process writes the shards it owns (`sharded/__R_0.distcp`) and rank 0 the DCP metadata, so
no process ever holds the whole model to save it. DCP records every tensor's global shape and
which slices each file holds, so a checkpoint loads on any number of processes (or on one, with
no process group at all): loading asks for the slices the *current* sharding needs and DCP reads
exactly those. That is what makes 2 -> 1 and 1 -> 2 resumes continue the same run.

The DCP state is flat and keyed by name, so nothing depends on the order of optimizer groups:

    model/<name>             weights one would evaluate (schedule-free: the averaged x)
    train/<name>             schedule-free only: the iterate y the optimizer steps from
    optim/<param>/<key>      every tensor of the optimizer state (moments, momentum, step)
    ema/<param>              the EMA shadow weights (train.ema)

Why not DCP's `get_optimizer_state_dict`: its name mapping fails on cadence's optimizers (a tied
embedding/head weight, Muon + AdamW as two torch optimizers). Keying by parameter name ourselves
is a few lines; group hyperparameters and non-tensor state go into trainer.pt with the rest.

With train.async_checkpoint, `start_sharded_save` hands the same tensors to DCP's
``async_save`` (staged to host memory, written on a thread over a gloo group of its own); see
async_save.py for who waits where.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from cadence.optim import is_schedule_free
from cadence.optim.registry import inner_optimizers
from cadence.optim.sharded import is_sharded
from cadence.runtime.distributed import reshard
from cadence.training.errors import CheckpointError

if TYPE_CHECKING:
    from cadence.training.trainer import Trainer

__all__ = [
    "DIRNAME",
    "consolidate",
    "failed_writes",
    "load_sharded",
    "save_sharded",
    "start_sharded_save",
]

DIRNAME = "sharded"


def _dcp() -> Any:
    """torch.distributed.checkpoint, imported at the first sharded save or load: its import
    (DTensor's op tables) costs over a second, and most runs (one process, DDP) never shard."""
    import torch.distributed.checkpoint as dcp
    import torch.distributed.checkpoint.metadata  # noqa: F401 - read as dcp.metadata

    return dcp


def _names(trainer: Trainer) -> dict[int, str]:
    return {id(p): n for n, p in reshard(trainer.model).named_parameters()}


def _tensors_and_small(trainer: Trainer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Everything but the evaluated weights (``model/``, read under `averaged_weights`): the
    DCP tensors, and what goes into trainer.pt instead (the optimizer groups with parameter
    names, the optimizer's non-tensor state, the EMA decay)."""
    names = _names(trainer)
    tensors: dict[str, Tensor] = {}
    if is_schedule_free(trainer.optimizer):
        sd = trainer.model.state_dict()
        tensors.update({f"train/{k}": v.detach().clone() for k, v in sd.items()})
    groups: list[list[dict[str, Any]]] = []
    extra: dict[str, Any] = {}
    for opt in inner_optimizers(trainer.optimizer):
        own = []
        for group in opt.param_groups:
            pnames = [names[id(p)] for p in group["params"]]
            own.append({**{k: v for k, v in group.items() if k != "params"}, "params": pnames})
            for p, pname in zip(group["params"], pnames):
                for key, value in opt.state.get(p, {}).items():
                    target = tensors if isinstance(value, Tensor) else extra
                    target[f"optim/{pname}/{key}"] = value
        groups.append(own)
    if trainer.ema is not None:
        tensors.update({f"ema/{n}": s for n, s in zip(trainer.ema.names, trainer.ema.shadow)})
    small: dict[str, Any] = {"optimizer_groups": groups, "optimizer_extra": extra}
    if trainer.ema is not None:
        small["ema_decay"] = trainer.ema.decay
    return tensors, small


def save_sharded(trainer: Trainer, path: Path) -> dict[str, Any]:
    """Write this rank's shards under `path` (a collective: every rank calls it).

    Returns what goes into trainer.pt instead: the optimizer groups with parameter names, the
    optimizer's non-tensor state and the EMA decay.
    """
    tensors, small = _tensors_and_small(trainer)
    with trainer.averaged_weights():
        tensors.update({f"model/{k}": v for k, v in reshard(trainer.model).state_dict().items()})
        with _single_process_ok(), failed_writes():
            _dcp().save(tensors, checkpoint_id=path, no_dist=not trainer.world.active)
    return small


def start_sharded_save(trainer: Trainer, path: Path) -> tuple[dict[str, Any], Future]:
    """`save_sharded` in the background (every rank calls it, at the same save).

    DCP's ``async_save`` copies this rank's shards into host memory before it returns (inside
    `averaged_weights`, so schedule-free's averaged weights are what is copied), then plans and
    writes them on a thread of its own, over `background_group`. Returns trainer.pt's part, as
    `save_sharded` does, and the future of the write: it resolves once every rank's shards and
    DCP's metadata are on disk, or raises DCP's CheckpointException on every rank.
    """
    tensors, small = _tensors_and_small(trainer)
    active = trainer.world.active
    if not active:
        _quiet_single_process_saves()
    with trainer.averaged_weights():
        tensors.update({f"model/{k}": v for k, v in reshard(trainer.model).state_dict().items()})
        started = _dcp().async_save(
            tensors, checkpoint_id=path, process_group=background_group(trainer), no_dist=not active
        )
    # torch returns an AsyncSaveResponse where staging itself is asynchronous (not here)
    return small, getattr(started, "upload_completion", started)


def background_group(trainer: Trainer) -> Any:
    """The gloo group of DCP's background saves, made at the first (every rank is at that save).

    Not the training group: DCP's collectives run on its thread while training's run on the
    loop, and collectives of one group must come in the same order on every rank. gloo even
    where training uses nccl: DCP's async save needs a CPU backend. None in one process."""
    writer = trainer.writer
    assert writer is not None, "a background save needs train.async_checkpoint"
    if writer.group is None and trainer.world.active:
        import torch.distributed as dist

        timeout = timedelta(seconds=trainer.cfg.train.dist_timeout_s)
        writer.group = dist.new_group(backend="gloo", timeout=timeout)
    return writer.group


@contextlib.contextmanager
def failed_writes() -> Iterator[None]:
    """A DCP save that failed on some rank as that rank's OSError (a full disk), raised on every
    rank: the CLI reports an OSError in one line, as it does for a whole checkpoint's failed
    write, where DCP's CheckpointException (a BaseException) prints every rank's traceback.
    Other failures stay DCP's exception, which names the ranks."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as exc:
        for _, (error, _trace) in sorted(exc.failures.items()):
            if isinstance(error, OSError):
                raise error from None
        raise


def _quiet_single_process_saves() -> None:
    """DCP warns that it "assumes the intent is to save in a single process" from the thread of
    a background save, where `_single_process_ok`'s catch_warnings (not thread-safe, and over by
    then) cannot reach; one process under train.distributed=fsdp means exactly that, so the
    message is filtered for the process (filterwarnings drops a filter it already has)."""
    warnings.filterwarnings(
        "ignore", message=".*intent is to save in a single process", category=UserWarning
    )


def _metadata(path: Path) -> dict[str, Any]:
    # DCP's metadata file is a pickle; callers read it only after its SHA-256 matched the
    # manifest rank 0 wrote when saving (checkpoint.verify).
    return _dcp().FileSystemReader(path).read_metadata().state_dict_metadata


def _template(meta: Any, like: Tensor | None) -> Tensor:
    """An empty tensor for DCP to fill: sharded like `like` when it is a DTensor of that shape."""
    dtype = meta.properties.dtype
    if like is not None and is_sharded(like) and tuple(like.shape) == tuple(meta.size):
        return torch.zeros_like(like, dtype=dtype)
    device = like.device if like is not None and not is_sharded(like) else "cpu"
    return torch.zeros(meta.size, dtype=dtype, device=device)


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """Silence DCP's "torch.distributed is disabled ... assuming the intent is to save/load in a
    single process": exactly the intent for a one-process FSDP-config run or an export."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*in a single process", category=UserWarning)
        yield


def _load(path: Path, templates: dict[str, Tensor], distributed: bool) -> None:
    with _single_process_ok():
        _dcp().load(templates, checkpoint_id=path, no_dist=not distributed)


@torch.no_grad()
def load_sharded(trainer: Trainer, path: Path, small: dict[str, Any]) -> None:
    """Fill the model, optimizer and EMA from `path`, resharded for this run's processes."""
    meta = _metadata(path)
    model = reshard(trainer.model)
    params = dict(model.named_parameters())
    current = model.state_dict()
    source = "train/" if is_schedule_free(trainer.optimizer) else "model/"
    templates: dict[str, Tensor] = {}
    for name, t in current.items():
        key = source + name
        if key not in meta:
            raise CheckpointError(f"{path}: has no {key}; saved by a different model")
        templates[key] = _template(meta[key], t)
    for key, m in meta.items():
        if key.startswith("optim/"):
            pname = key[len("optim/") :].rsplit("/", 1)[0]
            if pname not in params:
                raise CheckpointError(f"{path}: optimizer state for unknown parameter {pname}")
            templates[key] = _template(m, params[pname])
    if trainer.ema is not None:
        for name, shadow in zip(trainer.ema.names, trainer.ema.shadow):
            templates[f"ema/{name}"] = _template(meta[f"ema/{name}"], shadow)
    _load(path, templates, trainer.world.active)

    for name, t in current.items():
        t.copy_(templates[source + name])
    values = {**templates, **small["optimizer_extra"]}
    for opt, saved_groups in zip(
        inner_optimizers(trainer.optimizer), small["optimizer_groups"], strict=True
    ):
        _load_optimizer(opt, saved_groups, values, params, path)
    if trainer.ema is not None:
        trainer.ema.decay = float(small["ema_decay"])
        for name, shadow in zip(trainer.ema.names, trainer.ema.shadow):
            shadow.copy_(templates[f"ema/{name}"])


def _load_optimizer(
    opt: Any,
    saved_groups: list[dict[str, Any]],
    values: dict[str, Any],
    params: dict[str, Tensor],
    path: Path,
) -> None:
    """torch's load_state_dict with the indices it expects, built from parameter names."""
    names = {id(p): n for n, p in params.items()}
    have = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    saved = [n for g in saved_groups for n in g["params"]]
    if have != saved:
        raise CheckpointError(f"{path}: optimizer parameters differ from this run's model")
    index = {name: i for i, name in enumerate(saved)}
    state: dict[int, dict[str, Any]] = {}
    for key, value in values.items():
        if key.startswith("optim/"):
            pname, skey = key[len("optim/") :].rsplit("/", 1)
            if pname in index:
                state.setdefault(index[pname], {})[skey] = value
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in saved_groups]
    opt.load_state_dict({"state": state, "param_groups": groups})


def consolidate(path: Path, prefix: str = "model/") -> dict[str, Tensor]:
    """Every tensor under `prefix` as one whole tensor, read on this process alone.

    What `cadence export` writes as one safetensors file; `prefix="ema/"` gives the EMA weights.
    """
    meta = _metadata(path)
    templates = {
        k: _template(m, None)
        for k, m in meta.items()
        if k.startswith(prefix) and isinstance(m, _dcp().metadata.TensorStorageMetadata)
    }
    _load(path, templates, distributed=False)
    return {k[len(prefix) :]: v for k, v in templates.items()}
