"""Checkpoints that hold everything and are never half-written.

A checkpoint is a folder `step_XXXXXXXX/` with the weights, the rest of the state (a torch file
read back with `weights_only=True`, so nothing is ever unpickled), and a manifest with the
SHA-256 of each file. Two layouts: "whole" (`model.safetensors`; single process and DDP, whose
replicas are identical) and "sharded" (FSDP: `sharded/`, written by every rank through
torch.distributed.checkpoint, see sharded.py). The folder is built under a temporary name,
fsynced and renamed into place: a crash mid-save leaves the previous checkpoints as they were,
and a file damaged later (truncated, flipped bytes, replaced) fails its checksum and is passed
over for an older one. With train.async_checkpoint the same folder is written in the background
(both layouts; the sharded one through DCP's async_save, renamed by rank 0 once every rank's
shards are written): async_save.py says who waits where.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from safetensors.torch import save_model
from torch import Tensor

from cadence.io import sha256_file
from cadence.runtime.distributed import World, barrier, broadcast_object
from cadence.training.async_save import BackgroundWriter, host_copy
from cadence.training.errors import CheckpointError  # also imported from here
from cadence.training.sharded import (
    DIRNAME,
    failed_writes,
    load_sharded,
    save_sharded,
    start_sharded_save,
)

if TYPE_CHECKING:
    from cadence.training.trainer import Trainer

FORMAT = 1
SHARDED_META = f"{DIRNAME}/.metadata"
T = TypeVar("T")


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """safetensors' `save_model`, with a failed write raised as the OSError it is.

    safetensors reports an I/O failure (a full disk) as its own SafetensorError, and torch.save
    as a RuntimeError from its zip writer; the CLI turns OSErrors into one line and exit 1.
    """
    try:
        save_model(model, str(path))
    except Exception as exc:
        _raise_os_error(exc, path)


def _raise_os_error(exc: Exception, path: Path) -> None:
    code = re.search(r"\(os error (\d+)\)", str(exc))
    if code is None:
        raise exc
    raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def tied_names(model: torch.nn.Module) -> list[list[str]]:
    """State-dict names grouped by the tensor they share (the head tied to the embedding)."""
    groups: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        groups.setdefault(id(t), []).append(name)
    return list(groups.values())


def save_whole_weights(model: torch.nn.Module, weights: dict[str, Tensor], path: Path) -> None:
    """safetensors of gathered FSDP2 weights, the same file `save_weights` writes unsharded.

    A tied alias (the head sharing the embedding) is stored once under the name save_model keeps
    (the first in sorted order), so the file does not depend on the number of processes or the
    wrapping, and load_model restores both names.
    """
    from safetensors.torch import save_file

    own = {min(names) for names in tied_names(model)}
    try:
        save_file({k: v.contiguous() for k, v in weights.items() if k in own}, str(path))
    except Exception as exc:
        _raise_os_error(exc, path)


def _save_state(state: dict[str, Any], path: Path) -> None:
    # Serialised in memory, written by Python: a failed write is an OSError, not torch's
    # RuntimeError("unexpected pos ...").
    buf = io.BytesIO()
    torch.save(state, buf)
    path.write_bytes(buf.getbuffer())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(trainer: Trainer, root: Path, keep_last: int = 3) -> Path:
    """Write `root/step_N/` atomically, then prune to the last `keep_last` plus the best.

    Sharded runs: every rank writes its shards into the temporary folder rank 0 created; rank 0
    then adds trainer.pt and the manifest and renames the folder into place. Otherwise rank 0
    alone writes (DDP replicas are identical). With train.async_checkpoint both happen in the
    background (async_save.py), unless this is the run's last checkpoint.
    """
    world = trainer.world
    final = root / f"step_{trainer.state.step:08d}"
    tmp = root / f".{final.name}.tmp-{broadcast_object(os.getpid(), world)}"
    writer = trainer.writer
    if writer is not None:
        writer.wait()  # the previous write is on disk before this one starts
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier(world)
    if writer is not None and not trainer.stopping:
        job = _Job.make(trainer, root, tmp, final, keep_last, snapshot=True)
        _submit(trainer, writer, tmp, job)
        barrier(world)
        return final
    try:
        sharded = save_sharded(trainer, tmp / DIRNAME) if trainer.sharded else None  # collective
        job = _Job.make(trainer, root, tmp, final, keep_last, snapshot=False)
        if job is not None:
            if sharded is not None:
                job.state["sharded"] = sharded
            job.write()
    finally:
        if world.is_main and tmp.exists():
            shutil.rmtree(tmp)
    barrier(world)
    return final


def _submit(trainer: Trainer, writer: BackgroundWriter, tmp: Path, job: _Job | None) -> None:
    """Hand this save to the background writer; `job`: rank 0's part (None on the others).

    Whole checkpoints: rank 0's thread writes the folder. Sharded: every rank starts DCP's
    asynchronous save of its shards (a collective, at the same save on every rank) and its
    thread waits for it; rank 0's then writes trainer.pt and the manifest and renames the
    folder. DCP gathers every rank's write on rank 0 before its save there ends, so the manifest
    lists every rank's finished shards without a barrier. A rank killed before that leaves the
    folder unrenamed; the others' saves then fail (at the latest at train.dist_timeout_s).
    """
    if not trainer.sharded:
        if job is not None:
            writer.submit(job.write)
        return
    small, written = start_sharded_save(trainer, tmp / DIRNAME)
    if job is None:
        writer.submit(lambda: _finished(written))
        return
    job.state["sharded"] = host_copy(small)
    writer.submit(lambda: job.write(after=lambda: _finished(written)))


def _finished(written: Future) -> None:
    """Until DCP's background save of this rank's shards ends; its error if it failed (on any
    rank: DCP's write step tells every rank)."""
    with failed_writes():
        written.result()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


class _Job:
    """One checkpoint's contents and how to write them. ``snapshot``: copied to host memory now
    (the write happens later, on another thread, while training changes the live tensors);
    otherwise read from the trainer while writing, as a synchronous save does."""

    @classmethod
    def make(
        cls, trainer: Trainer, root: Path, tmp: Path, final: Path, keep: int, snapshot: bool
    ) -> _Job | None:
        """Rank 0's job; None on the other ranks (they write shards, if anything)."""
        return cls(trainer, root, tmp, final, keep, snapshot) if trainer.world.is_main else None

    def __init__(
        self, trainer: Trainer, root: Path, tmp: Path, final: Path, keep: int, snapshot: bool
    ) -> None:
        self.root, self.tmp, self.final, self.keep = root, tmp, final, keep
        self.state = trainer.state_dict()  # no collective: sharded tensors are in the shards
        self.metric, self.higher_is_better = trainer.checkpoint_metric
        self.step, self.world_size = trainer.state.step, trainer.world.size
        self.weights: Callable[[Path], None] = trainer.save_weights
        if snapshot:
            self.state = host_copy(self.state)
        if snapshot and not trainer.sharded:  # sharded weights: in DCP's copy (sharded.py)
            with trainer.averaged_weights():  # what save_weights would write
                weights = host_copy(dict(trainer.model.state_dict()))
            model = trainer.model
            self.weights = lambda path: save_whole_weights(model, weights, path)

    def write(self, after: Callable[[], None] | None = None) -> None:
        """The folder, checksummed and renamed into place; ``after``: what must end first (a
        sharded save: every rank's shards). Whatever fails, no temporary folder is left."""
        try:
            if after is not None:
                after()
            self._write()
        finally:
            if self.tmp.exists():
                shutil.rmtree(self.tmp)

    def _write(self) -> None:
        tmp, state = self.tmp, self.state
        _save_state({"format": FORMAT, **state}, tmp / "trainer.pt")
        if "sharded" not in state:
            self.weights(tmp / "model.safetensors")
        files = _files(tmp)
        manifest = {
            "format": FORMAT,
            "layout": "sharded" if "sharded" in state else "whole",
            "step": self.step,
            "world_size": self.world_size,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "files": {name: sha256_file(tmp / name) for name in files},
        }
        (tmp / "checkpoint.json").write_text(json.dumps(manifest, indent=2))
        for name in [*files, "checkpoint.json"]:
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        for folder in {(tmp / name).parent for name in files}:
            _fsync_dir(folder)
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(tmp, self.final)
        _fsync_dir(self.root)
        prune(self.root, self.keep)


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / "checkpoint.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: missing or unreadable checkpoint.json ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a cadence checkpoint (format {FORMAT})")
    return manifest


def verify(path: Path) -> dict[str, Any]:
    """Checksums before anything is parsed: a damaged file is refused, never half-loaded."""
    manifest = read_manifest(path)
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise CheckpointError(f"{path}: checkpoint.json lists no files")
    weights = "model.safetensors" if manifest.get("layout", "whole") == "whole" else SHARDED_META
    for name in sorted({"trainer.pt", weights, *listed}):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if sha256_file(file) != listed.get(name):
            raise CheckpointError(f"{file}: checksum mismatch (truncated or corrupted)")
    return manifest


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir())


def latest_valid(root: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and one warning line per newer one passed over."""
    warnings = []
    for path in reversed(list_checkpoints(root)):
        try:
            verify(path)
            return path, warnings
        except CheckpointError as exc:
            warnings.append(f"skipping checkpoint {exc}")
    return None, warnings


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints and the one with the best recorded metric."""
    paths = list_checkpoints(root)
    keep = set(paths[-keep_last:])
    scored = []
    for p in paths:
        try:
            m = read_manifest(p)
        except CheckpointError:
            continue
        if m.get("metric") is not None:
            sign = -1.0 if m.get("higher_is_better") else 1.0
            scored.append((sign * m["metric"], p))
    if scored:
        keep.add(min(scored)[1])
    for p in paths:
        if p not in keep:
            shutil.rmtree(p)


def load_checkpoint(path: Path, verified: bool = False) -> dict[str, Any]:
    if not verified:
        verify(path)
    try:
        return torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure means the file is unusable
        # torch's own message spans paragraphs (and suggests weights_only=False): not shown.
        raise CheckpointError(
            f"{path / 'trainer.pt'}: not a readable weights-only checkpoint "
            f"({type(exc).__name__}); remove {path} to resume from an earlier one"
        ) from None


def restore(trainer: Trainer, path: Path, verified: bool = False) -> None:
    """Put the trainer exactly where it was when `path` was saved (every rank calls this).

    `verified`: the caller took `path` from `latest_valid`, which already checked every
    checksum; they are not read a second time.
    """
    check = read_manifest if verified else verify
    manifest = agreed(lambda: check(path), trainer.world)
    state = load_checkpoint(path, verified=True)
    sharded = manifest.get("layout") == "sharded"
    if sharded != trainer.sharded:
        kind = "sharded (FSDP)" if sharded else "whole-model"
        raise CheckpointError(
            f"{path}: a {kind} checkpoint cannot resume a run with "
            f"train.distributed={trainer.cfg.train.distributed}"
        )
    if sharded:
        load_sharded(trainer, path / DIRNAME, state["sharded"])
    elif "train_weights" not in state:  # schedule-free restores its iterate from the state
        try:
            trainer.load_weights(path / "model.safetensors")
        except Exception as exc:  # noqa: BLE001
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"{path / 'model.safetensors'}: cannot be read ({first}); "
                f"remove {path} to resume from an earlier one"
            ) from None
    trainer.load_state_dict(state)
    adapt_to_world(trainer, int(manifest.get("world_size") or trainer.world.size))


def adapt_to_world(trainer: Trainer, written_by: int) -> None:
    """A run resumed on another number of processes than wrote its checkpoint (an elastic job
    that lost or gained a node, or a resume with another ``--nproc``): the global batch is the
    config's whatever the count, so only each process's share changes. With fewer processes and
    no batch.micro_size, each one would hold a larger share in one pass, which is more memory
    than it had; it accumulates over passes of its former share instead (``pass_size``, kept
    in the state from then on). Rank 0 says what changed."""
    now = trainer.world.size
    if written_by == now:
        return
    limit = trainer.micro_size
    if written_by > now and limit is None:
        limit = trainer.state.pass_size = -(-trainer.ramp.max_size // written_by)
    if trainer.world.is_main:
        passes = f"; each process accumulates passes of at most {limit} samples" if limit else ""
        plural = "es" if now > 1 else ""
        print(
            f"cadence: resuming on {now} process{plural} (the checkpoint was written by "
            f"{written_by}): the global batch stays as configured{passes}",
            flush=True,
        )


def agreed(fn: Callable[[], T], world: World) -> T:
    """`fn()` on rank 0 (checksums, file reads), its result or CheckpointError on every rank,
    so the ranks never disagree about which checkpoint is usable."""
    result, error = None, None
    if world.is_main:
        try:
            result = fn()
        except CheckpointError as exc:
            error = str(exc)
    result, error = broadcast_object((result, error), world)
    if error is not None:
        raise CheckpointError(error)
    return result  # type: ignore[return-value]
