"""The config's shape: typed dataclasses, one field per key, each with a default and a comment.

Step-valued schedule keys (``schedule.warmup``, ``schedule.step_size``, ``schedule.milestones``)
take an integer number of optimizer steps or a float fraction of the run in [0, 1), so that one
recipe serves a 20-step smoke run and a full run alike. The run is its horizon: the step at which
the first of its budgets ends (``train.max_steps``, or ``max_samples`` / ``max_tokens`` turned
into steps; see ``cadence.config.horizon``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A user error in a config: the message names the key and what would fix it.

    The message is always one line: user text echoed into it (a key, a --set value) has its line
    breaks escaped, so the CLI's error stays a single line whatever was typed.
    """

    def __init__(self, message: str) -> None:
        super().__init__("\\n".join(str(message).splitlines()) or str(message))


class ConfigWarning(UserWarning):
    """A config that was adjusted rather than refused (the CLI prints it as one line)."""


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # see `cadence list optimizers`
    lr: float | Literal["auto"] = 3e-3  # base (peak) LR; 'auto' runs the LR range test first
    momentum: float = 0.0  # heavy-ball momentum (sgd, muon, schedulefree-sgd); 0 = library default
    nesterov: bool = False  # Nesterov momentum for sgd (needs momentum > 0)
    weight_decay: float = (
        0.0  # decoupled for adamw/lion/muon; never applied to norms/biases/embeddings
    )
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam-family and lion betas
    eps: float = 1e-8  # adam-family epsilon
    aux_lr: float | None = None  # lr of the AdamW part of muon (embeddings, head, norms); null = lr
    body_lr_ratio: float = 1.0  # fine-tuning: lr of all but the output head, as a fraction of it
    loraplus_ratio: float = 1.0  # LoRA+: the adapters' B matrices at this multiple of the lr
    fused: bool | None = None  # torch's fused kernel (adam/adamw/sgd/gd); null = where it runs


@dataclass
class ScheduleConfig:
    name: str = "constant"  # see `cadence list schedules`
    # linear warmup in front of the schedule: steps, a fraction of the run, or 'auto' (from
    # the optimizer's second-moment horizon, at most 10 % of the run; see auto.json)
    warmup: int | float | Literal["auto"] = 0
    gamma: float = 0.1  # decay factor for exponential / step / multistep
    per: Literal["step", "epoch"] = "step"  # exponential decay applies gamma per step or per epoch
    step_size: int | float | None = (
        None  # step schedule: decay every N steps or run fraction (null = max_steps // 3)
    )
    milestones: list[int | float] = field(
        default_factory=list
    )  # multistep: steps (or run fractions) at which lr *= gamma
    min_lr_ratio: float = 0.0  # floor of cosine/linear/polynomial/wsd as a fraction of lr
    decay_fraction: float = 0.2  # wsd: fraction of training spent in the cooldown
    decay_steps: int | None = None  # wsd: the cooldown in steps instead (null = decay_fraction)
    cooldown: Literal["linear", "1-sqrt", "cosine"] = "linear"  # wsd cooldown shape
    power: float = 1.0  # polynomial decay power
    timescale: int | None = None  # inverse-sqrt: steps before the 1/sqrt decay starts
    pct_start: float = 0.3  # onecycle: fraction of steps spent increasing the lr
    # momentum (sgd, muon) or beta1 (adam family, lion) by step, linear between points
    # [[position, value], ...]; a position is a step (integer) or a run fraction (float, 1.0 = end)
    momentum: list[list[int | float]] | None = None
    # weight decay as a multiple of optimizer.weight_decay: points as above, or 'lr' (follow the
    # LR multiplier, as modded-nanogpt ties it to the LR schedule)
    weight_decay: list[list[int | float]] | Literal["lr"] | None = None
    # lm: training sequence length by step (sequence-length warmup), points as above, up to
    # model.seq_len; rounded down to a multiple of 8. Evaluation runs at model.seq_len.
    seq_len: list[list[int | float]] | None = None
    # what a shortened batch keeps: tokens (cut each sequence into pieces) | sequences (drop tails)
    seq_len_batch: Literal["tokens", "sequences"] = "tokens"


@dataclass
class PlateauConfig:
    enabled: bool = False  # loss-driven lr reduction, composed with the schedule
    monitor: Literal["val_loss", "train_loss"] = "val_loss"  # train_loss is EMA-smoothed
    patience: int = 3  # evaluations without improvement before reducing
    factor: float = 0.5  # multiply the lr by this on a plateau
    threshold: float = 1e-3  # relative improvement that counts as better
    cooldown: int = 0  # evaluations to wait after a reduction
    min_scale: float = 1e-3  # floor of the plateau multiplier


# batch.size: auto: the batch the pilot measures at when batch.micro_size does not set it
PILOT_BATCH = 8


@dataclass
class BatchConfig:
    # global batch in samples; 'full' for full-batch GD; 'auto': a pilot measures the gradient
    # noise scale and the batch is chosen from the critical batch and the budget (auto.json)
    size: int | Literal["full", "auto"] = 32
    micro_size: int | None = None  # micro-batch that fits in memory; gradients accumulate to `size`
    # ramp: [[fraction, size], ...], or auto: double toward the measured critical batch size
    schedule: list[list[float]] | Literal["auto"] = field(default_factory=list)
    max_size: int | None = None  # auto: the largest batch it may grow to (null = 8 x batch.size)
    # lr ∝ (B/B0)^alpha when the batch ramps: alpha in [0, 2], or sqrt (0.5) | linear (1) | none
    lr_scaling: float | Literal["sqrt", "linear", "none"] = "sqrt"
    pilot: float = 0.1  # size: auto: the share of the budget its pilot may spend, (0, 0.1]


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps; the schedules' horizon unless a budget ends first
    max_samples: int | None = None  # stop after this many training samples (then the horizon)
    max_tokens: int | None = None  # stop after this many training tokens (lm; then the horizon)
    max_time_s: float | None = None  # stop after this much wall time; the schedules follow it
    eval_every: int = 100  # evaluate every N steps (and at the end)
    eval_samples: int | None = 512  # cap on validation samples per evaluation (null = all)
    log_every: int = 10  # write a metrics row every N steps
    seed: int = 0  # seeds model init and data order
    target: float | None = None  # stop when the validation metric reaches this (see list workloads)
    stop_at_target: bool = True  # false: record the step the target was reached but keep training
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 = autocast for forward/backward
    clip_grad_norm: float | None = None  # clip the global gradient norm to this
    checkpoint_every: int | None = None  # save a checkpoint every N steps (always at the end)
    keep_checkpoints: int = 3  # keep the newest N checkpoints (plus the best by the metric)
    # write checkpoints on a background thread: training pauses only to copy the state to host
    # memory (FSDP2: DCP's async_save of each rank's shards); the run's last one is written at once
    async_checkpoint: bool = False
    on_nonfinite: Literal["stop", "skip", "rollback"] = "stop"  # policy for a NaN/inf step
    rollback_lr_factor: float = 0.5  # rollback: multiply the LR by this after each reload
    # a loss spike: a training loss spike_z robust deviations (median, MAD) above the last
    # spike_window losses; off | warn (record it) | skip (drop that update) | rollback (reload
    # the newest checkpoint, skip the data since it, LR x rollback_lr_factor)
    on_spike: Literal["off", "warn", "skip", "rollback"] = "off"
    spike_z: float = 6.0  # how many robust deviations above the median make a spike
    spike_window: int = 100  # recent losses the median and MAD are taken over
    # data windows [start, end) of sample positions the run jumps over, as a rollback after a
    # spike does (e.g. [[38400, 39744]])
    skip_samples: list[list[int]] | None = None
    inspect_every: int | None = None  # per-layer health every N steps (inspect.jsonl; null = off)
    sharpness_every: int | None = (
        None  # the loss Hessian's top eigenvalue every N steps (null = off)
    )
    compile: bool | Literal["auto"] = "auto"  # torch.compile per block; auto = where it pays
    # (Transformer blocks, >= 1000 steps, a C++ compiler on CPU; not under FSDP)
    prefetch: bool | None = None  # read the next batch in the background (null = on CUDA for
    # data read from disk, e.g. a prepared corpus)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    ema: float | None = None  # EMA decay of weights (e.g. 0.999); evaluated as ema_val_loss
    lawa: int | None = None  # LAWA: average the latest N snapshots; evaluated as lawa_val_loss
    lawa_every: int | float = 0.03  # steps (or run fraction) between LAWA snapshots
    early_stop_patience: int | None = None  # stop after N evaluations without a better metric
    tol_grad_norm: float | None = None  # convergence: stop when the gradient norm falls below
    tol_rel_loss: float | None = None  # convergence: stop when |dL|/|L| between steps falls below
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"  # under torchrun: auto = ddp
    dist_timeout_s: float = 300.0  # a collective waiting longer (a dead rank) fails the run
    threads: int | None = None  # torch intra-op threads (null = torch's default)
    progress: bool = True  # show a progress bar
    log_noise_scale: bool = False  # measure the gradient noise scale (critical batch) as it trains
    noise_scale_every: int | None = None  # steps between measurements (null = eval_every)


@dataclass
class DataConfig:
    path: str | None = None  # lm: text, .jsonl, .parquet, a folder or a prepare-data folder
    # (null = sympy); text is prepared into the data cache ($CADENCE_CACHE) on first use
    sampling: Literal["packed", "random"] = "packed"  # lm: windows in turn, or at random offsets
    tokenizer: Literal["byte", "bpe"] = "byte"  # lm tokenizer; bpe is trained on the train split
    vocab_size: int = 1024  # bpe vocabulary size
    max_bytes: int | None = 4_000_000  # read at most this much text (null = all)
    val_fraction: float | None = None  # held out for validation (null = 0.05 text, 0.2 otherwise)
    voices: int | None = None  # speech: synthetic training voices (null = all 160; 40 held out)
    # lm: text (a corpus), or a JSONL file of conversations ({"messages": [...]}, chat) or of
    # {"prompt", "completion"} pairs (instruction), rendered with the model's chat template
    format: Literal["text", "chat", "instruction"] = "text"
    loss_on: Literal["answers", "all"] = "answers"  # chat/instruction: the tokens the loss counts
    # chat/instruction: pack whole conversations into each window (positions restart, and
    # attention stays within a conversation where the model supports it), or one per row
    packing: bool = False


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning: adapters built by the `peft` library (models/adapters.py)."""

    method: Literal["none", "lora", "dora"] = "none"  # none = train the model's own weights
    r: int = 8  # adapter rank
    # scaling numerator: the update is (alpha / r) * B A (alpha / sqrt(r) with rslora)
    alpha: float = 16.0
    dropout: float = 0.0  # dropout on the adapter's input
    # modules to adapt: peft's names (a module whose name is, or ends with ".NAME"), or all-linear
    # (every linear layer but the output head)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)


@dataclass
class ModelConfig:
    arch: str | None = None  # lm: gpt | hf; mnist: cnn | mlp; digits: mlp; logreg: linear
    n_layer: int = 4  # gpt blocks
    n_head: int = 4  # gpt attention heads
    d_model: int = 128  # gpt width
    seq_len: int = 128  # gpt context length
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"  # gpt normalisation
    tie_embeddings: bool = True  # gpt: share the embedding and output head
    dropout: float = 0.0  # gpt, speech and asr dropout
    # gpt: sp (standard) | mup (maximal update: an LR tuned at base_width holds at any d_model)
    parametrization: Literal["sp", "mup"] = "sp"
    base_width: int = 128  # gpt, mup: the d_model its LR was tuned at (width multiplier = 1)
    hidden: list[int] = field(default_factory=lambda: [128])  # mlp hidden widths
    channels: list[int] | None = None  # speech: conv channels per block (null = [32, 64, 128])
    augment: bool = True  # speech, asr: SpecAugment time/frequency masking while training
    l2: float = 1e-3  # logreg: L2 penalty in the objective (keeps the optimum finite)
    hf: str | None = None  # lm: a local Hugging Face causal-LM directory (from_pretrained, offline)
    hf_config: dict[str, Any] | None = None  # lm: a fresh HF model, e.g. {model_type: llama, ...}
    freeze: list[str] = field(default_factory=list)  # parameter-name patterns kept fixed (fnmatch)
    peft: PeftConfig = field(default_factory=PeftConfig)  # adapters (LoRA, DoRA) on a frozen base


@dataclass
class PrivacyConfig:
    # DP-SGD (Opacus): each example's gradient clipped, Gaussian noise added, batches drawn by
    # Poisson sampling at rate batch.size / training samples, and the privacy spent accounted
    enabled: bool = False
    target_epsilon: float | None = None  # the ε the run ends at: noise_multiplier derived from it
    delta: float = 1e-5  # δ of (ε, δ)-DP; below 1 / the number of training samples
    max_grad_norm: float = 1.0  # the L2 norm each example's gradient is clipped to
    noise_multiplier: float | None = None  # σ: noise std / max_grad_norm (null: target_epsilon)
    accountant: Literal["prv", "rdp"] = "prv"  # PRV (tight) or RDP (the classic bound)
    # flat: an example's whole gradient clipped to max_grad_norm; per_layer: each parameter
    # tensor to max_grad_norm / sqrt(tensors), which keeps the whole within max_grad_norm
    clipping: Literal["flat", "per_layer"] = "flat"
    max_epsilon: float | None = None  # stop at the last step whose ε stays within this


@dataclass
class Config:
    workload: str = "lm"  # see `cadence list workloads`, or package.module:function (your own)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    plateau: PlateauConfig = field(default_factory=PlateauConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
