"""Differentially private training (DP-SGD) with Opacus's parts: its per-example gradients, its
clipping and noise, its accountants and its noise calibration.

What cadence adds is the wiring into its own step, and one rule that makes the run exact to
resume without any sampler state: step ``k``'s Poisson draw and its noise come from generators
seeded by (train.seed, k). Opacus's `DPOptimizer` is used for what it does to gradients
(`clip_and_accumulate` after each micro-batch, `add_noise` once per step), not as the
optimizer: the run's own optimizer (any of cadence's) then steps on the private gradient, so
every optimizer and schedule composes with privacy, and Opacus's data loader is not needed.

The gradient of a step is (sum over the drawn examples of each one's gradient clipped to
``max_grad_norm`` + N(0, (sigma * max_grad_norm)^2)) / batch.size -- the expected batch, not
the drawn count, as DP-SGD with Poisson sampling has it (Abadi et al. 2016; Opacus does the
same with ``loss_reduction="mean"``). An example's loss is its mean over its tokens for text.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from cadence.config import Config, ConfigError
from cadence.runtime.distributed import SINGLE, World
from cadence.training.batches import share_of
from cadence.training.rng import rng_preserved
from cadence.training.step import grad_norm_and_clip

if TYPE_CHECKING:
    from cadence.optim import AnyOptimizer
    from cadence.workloads import Workload

_DRAW, _NOISE = 0x5DEECE66D, 0x2545F4914F6CDD1D  # separate streams for the draw and the noise


def _generator(seed: int, step: int, stream: int, device: Any = "cpu") -> torch.Generator:
    seeded = torch.Generator(device=device)
    return seeded.manual_seed((seed * 1_000_003 + step * 7919 + stream) % 2**63)


def epsilon_after(steps: int, noise_multiplier: float, sample_rate: float, cfg: Config) -> float:
    """ε spent after ``steps`` steps at (σ, q), by the configured accountant: a function of the
    step count alone, as every step has the same σ and q."""
    from opacus.accountants import create_accountant

    if steps <= 0:
        return 0.0
    accountant = create_accountant(cfg.privacy.accountant)
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():  # RDP's "optimal order is the largest alpha": a looser bound
        warnings.simplefilter("ignore", UserWarning)
        return float(accountant.get_epsilon(delta=cfg.privacy.delta))


def last_step_within(
    max_epsilon: float, horizon: int, noise_multiplier: float, sample_rate: float, cfg: Config
) -> int:
    """The last step (0..horizon) whose ε is at most ``max_epsilon`` (ε grows with steps)."""
    low, high = 0, horizon  # invariant: eps(low) <= max_epsilon
    if epsilon_after(high, noise_multiplier, sample_rate, cfg) <= max_epsilon:
        return high
    while high - low > 1:
        mid = (low + high) // 2
        if epsilon_after(mid, noise_multiplier, sample_rate, cfg) <= max_epsilon:
            low = mid
        else:
            high = mid
    return low


def check_private_model(model: nn.Module) -> None:
    """Refuse, in one line naming it, a layer Opacus cannot compute per-example gradients for
    or one that mixes examples (BatchNorm)."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        first = str(errors[0]).strip().splitlines()[0]
        raise ConfigError(
            f"privacy.enabled: the model cannot train privately: {first} (use GroupNorm or "
            "LayerNorm instead of BatchNorm, or set privacy.enabled: false)"
        )


def check_per_example_gradients(workload: Workload) -> None:
    """Refuse a model whose per-example gradients do not split by example, found by one
    backward on two examples: a layer fed one input for the whole batch (GPT-2's position
    embeddings get one row of positions, broadcast) yields a gradient of batch 1 that no clip
    can attribute. The weights, gradients and random streams are left as they were."""
    from opacus import GradSampleModule

    model = workload.model
    hooks = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    try:
        with rng_preserved(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Full backward hook is firing")
            workload.loss_sum(model, workload.batch(torch.arange(2))).backward()
        for name, p in model.named_parameters():
            sample = getattr(p, "grad_sample", None)
            if p.requires_grad and (sample is None or sample.shape[0] != 2):
                got = "none" if sample is None else f"a batch of {sample.shape[0]}"
                raise ConfigError(
                    f"privacy.enabled: the model cannot train privately: {name} gets {got} "
                    "per-example gradients for 2 examples (a layer that shares its input "
                    "across the batch); use a model without it or set privacy.enabled: false"
                )
    finally:
        hooks.cleanup()  # removes the hooks and the per-example gradients
        model.zero_grad(set_to_none=True)


def resolve_privacy(cfg: Config, workload: Workload, steps: int, world: World) -> Config:
    """The config with the noise multiplier it trains with (derived from target_epsilon where
    not given), after the checks that need the built model and data; unchanged when privacy is
    off. Run before anything is written, so a refusal leaves nothing behind."""
    p = cfg.privacy
    if not p.enabled:
        return cfg
    if world.active and world.mode != "ddp":
        raise ConfigError(
            f"train.distributed: {world.mode} does not run privately (per-example gradients "
            "need whole parameters); set train.distributed: ddp"
        )
    check_private_model(workload.model)
    check_per_example_gradients(workload)
    n, size = workload.n_train, int(cfg.batch.size)
    if size >= n:
        raise ConfigError(
            f"batch.size: {size} samples of {n} would sample every example at every step; "
            "privacy.enabled needs a batch smaller than the training set"
        )
    if n * p.delta > 1:
        raise ConfigError(
            f"privacy.delta: {p.delta} is above 1 / {n} training samples, which would allow "
            "leaking an example outright; set privacy.delta below 1/n (1e-5 for n < 100,000)"
        )
    rate = size / n
    sigma = p.noise_multiplier
    if sigma is None:
        from opacus.accountants.utils import get_noise_multiplier

        with warnings.catch_warnings():  # RDP's "optimal order is the largest alpha"
            warnings.simplefilter("ignore", UserWarning)
            sigma = get_noise_multiplier(
                target_epsilon=p.target_epsilon,
                target_delta=p.delta,
                sample_rate=rate,
                steps=steps,
                accountant=p.accountant,
            )
    try:  # the bound itself: a noise too small for the accountant fails here, not mid-run
        spent = epsilon_after(steps, sigma, rate, cfg)
    except (MemoryError, ValueError, OverflowError, RuntimeError):
        raise ConfigError(
            f"privacy.noise_multiplier: {sigma} is too small for the {p.accountant} "
            "accountant to bound ε over the run; raise it (or set privacy.accountant: rdp)"
        ) from None
    given = p.target_epsilon is not None and p.noise_multiplier is not None
    if given and spent > p.target_epsilon * 1.01:  # get_noise_multiplier's own tolerance
        raise ConfigError(
            f"privacy.noise_multiplier: {sigma} spends ε = {spent:.3g} over the "
            f"{steps} steps, above privacy.target_epsilon {p.target_epsilon}; raise it or "
            "remove it to derive it"
        )
    return dataclasses.replace(cfg, privacy=dataclasses.replace(p, noise_multiplier=float(sigma)))


class PrivateGradients:
    """One run's DP-SGD: which examples a step draws, its private gradient, the ε spent."""

    def __init__(
        self,
        cfg: Config,
        optimizer: AnyOptimizer,
        workload: Workload,
        steps: int,
        world: World = SINGLE,
    ) -> None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer, DPPerLayerOptimizer

        p, model, n_train = cfg.privacy, workload.model, workload.n_train
        check_private_model(model)
        if p.noise_multiplier is None:
            raise ConfigError(
                "privacy.noise_multiplier: not resolved; build the run with cadence.train "
                "(or pass the config through cadence.training.privacy.resolve_privacy)"
            )
        self.cfg, self.n, self.seed = cfg, n_train, cfg.train.seed
        self.model, self.workload, self.world = model, workload, world
        self.batch = int(cfg.batch.size)
        self.sample_rate = self.batch / n_train
        self.noise_multiplier = float(p.noise_multiplier)
        self.max_grad_norm = p.max_grad_norm
        # The hooks that compute per-example gradients go on the model's own layers; the run
        # keeps calling the model itself, so names, checkpoints and exports are unchanged.
        self.hooks = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        # per_layer: each parameter tensor clipped to max_grad_norm / sqrt(k) on its own, so an
        # example's whole gradient still has norm <= max_grad_norm and the noise is the same
        clip: float | list[float] = self.max_grad_norm
        kind: type = DPOptimizer
        if p.clipping == "per_layer":
            k = sum(1 for g in optimizer.param_groups for q in g["params"] if q.requires_grad)
            clip, kind = [self.max_grad_norm / math.sqrt(k)] * k, DPPerLayerOptimizer
        self.dp = kind(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=clip,
            expected_batch_size=self.batch,
            loss_reduction="sum",
        )
        self.params = [q for q in self.dp.params if q.requires_grad]
        within = p.max_epsilon
        self.last_step = (
            None
            if within is None
            else last_step_within(within, steps, self.noise_multiplier, self.sample_rate, cfg)
        )

    def draw(self, step: int) -> Tensor:
        """Step ``step``'s examples: each one independently with probability batch.size / n."""
        chosen = torch.rand(self.n, generator=_generator(self.seed, step, _DRAW)) < self.sample_rate
        return torch.nonzero(chosen).flatten()

    def batches(self, step: int, micro_size: int | None) -> tuple[list[Any], int]:
        """Step ``step``'s draw as micro-batches of at most ``micro_size`` (the trainer's: its
        batch.micro_size, or the limit of a run resumed on fewer processes), and its loss units."""
        # no padding across ranks: the model is called outside DDP, so no forward is collective
        return share_of(self.workload, self.draw(step), self.world, micro_size, pad_to=None)

    def backward(
        self, micro_batches: Sequence[Any], units: int, step: int
    ) -> tuple[Tensor, Tensor]:
        """Per-example gradients, clipped and summed micro-batch by micro-batch, then the noise:
        (the drawn examples' mean loss, the private gradient's norm), on the device."""
        self.dp.zero_grad(set_to_none=True)
        units_per_example = max(1, self.workload.tokens_per_sample)
        total = None
        for batch in micro_batches:
            loss = self.workload.loss_sum(self.model, batch)
            with warnings.catch_warnings():  # Opacus's hooks on a first layer: inputs need no grad
                warnings.filterwarnings("ignore", "Full backward hook is firing")
                (loss / units_per_example).backward()
            self.dp.clip_and_accumulate()
            for q in self.params:
                q.grad_sample = None
            part = loss.detach().float()
            total = part if total is None else total + part
        for q in self.params:  # an empty draw still gets its noise
            if q.summed_grad is None:
                q.summed_grad = torch.zeros_like(q)
        if self.world.active:
            # The clipped sums of every process add up before the one noise draw, which every
            # process makes alike (the same seeded generator): the gradient is the one a single
            # process would compute, up to the order of float additions. DDP's own reduction
            # never runs: the model is called directly, not through its DDP wrapper.
            for q in self.params:
                torch.distributed.all_reduce(q.summed_grad)
        self.dp.generator = _generator(self.seed, step, _NOISE, self.params[0].device)
        self.dp.add_noise()
        for q in self.params:
            q.grad /= self.batch
            q.summed_grad = None
        # train.clip_grad_norm then clips the private gradient as a whole: post-processing,
        # which costs no privacy
        norm = grad_norm_and_clip(self.params, self.cfg.train.clip_grad_norm)
        # scaled as `_local_loss` scales a share: the step's read averages them over processes
        share = max(units, 1) / self.world.size
        mean = (total if total is not None else torch.zeros(())) / share
        return mean, norm

    def close(self) -> None:
        """The model without Opacus's hooks and per-example attributes, as it was built."""
        self.hooks.cleanup()

    def epsilon(self, steps: int) -> float:
        return epsilon_after(steps, self.noise_multiplier, self.sample_rate, self.cfg)

    def summary(self, steps: int) -> dict[str, Any]:
        p = self.cfg.privacy
        return {
            "epsilon": self.epsilon(steps),
            "delta": p.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "max_grad_norm": self.max_grad_norm,
            "clipping": p.clipping,
            "accountant": p.accountant,
            "steps": steps,
            "last_step_within_max_epsilon": self.last_step,
        }


def private_gradients(
    cfg: Config, optimizer: AnyOptimizer, workload: Workload, steps: int, world: World = SINGLE
) -> PrivateGradients | None:
    """The run's DP-SGD where ``privacy.enabled`` asks for it; None for a plain run."""
    if not cfg.privacy.enabled:
        return None
    return PrivateGradients(cfg, optimizer, workload, steps, world)
