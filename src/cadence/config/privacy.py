"""The rules of the ``privacy:`` section that the config alone decides.

What needs the built model or data (a layer Opacus cannot compute per-example gradients for, the
sampling rate, more than one process) is checked where they exist, in
``cadence.training.privacy``.
"""

from __future__ import annotations

from cadence.config.schema import Config, ConfigError


def check_privacy(cfg: Config) -> None:
    """Raise ConfigError (one line naming the key) unless the privacy settings can hold."""
    p = cfg.privacy
    if not p.enabled:
        for key in ("target_epsilon", "noise_multiplier", "max_epsilon"):
            if getattr(p, key) is not None:
                raise ConfigError(
                    f"privacy.{key}: set while privacy.enabled is false; set privacy.enabled: "
                    f"true to train privately, or remove privacy.{key}"
                )
        return
    # Both may be set: a run's config.yaml records the noise it derived beside its target
    # (the run then checks that the noise stays within the target).
    if p.target_epsilon is None and p.noise_multiplier is None:
        raise ConfigError(
            "privacy.target_epsilon: give privacy.target_epsilon (the noise is derived from "
            "it) or privacy.noise_multiplier"
        )
    for key in ("target_epsilon", "noise_multiplier", "max_epsilon", "max_grad_norm"):
        value = getattr(p, key)
        if value is not None and not value > 0:
            raise ConfigError(f"privacy.{key}: must be > 0, got {value}")
    if not 0 < p.delta < 1:
        raise ConfigError(f"privacy.delta: must be in (0, 1), got {p.delta}")
    _check_strategy(cfg)


def _check_strategy(cfg: Config) -> None:
    """What would break the guarantee or its accounting."""
    b, t = cfg.batch, cfg.train
    if not isinstance(b.size, int) or isinstance(b.size, bool):
        raise ConfigError(
            f"batch.size: {b.size} cannot be sampled privately; privacy.enabled draws each "
            "batch by Poisson sampling at rate batch.size / training samples, so give a number"
        )
    auto = [
        k
        for k, v in (("optimizer.lr", cfg.optimizer.lr), ("schedule.warmup", cfg.schedule.warmup))
        if v == "auto"
    ]
    if auto:
        raise ConfigError(
            f"{auto[0]}: auto measures on the training data, which spends privacy that "
            "privacy.enabled does not account; give a value"
        )
    if b.schedule:
        raise ConfigError(
            "batch.schedule: a batch ramp changes the sampling rate that privacy.enabled "
            "accounts for; remove batch.schedule"
        )
    if t.precision != "fp32":
        raise ConfigError(
            f"train.precision: {t.precision} is not supported with privacy.enabled "
            "(per-example gradients in fp32); set train.precision: fp32"
        )
    if t.on_spike in ("skip", "rollback") or t.on_nonfinite == "rollback":
        key = "on_spike" if t.on_spike in ("skip", "rollback") else "on_nonfinite"
        raise ConfigError(
            f"train.{key}: {getattr(t, key)} decides from a private batch's loss whether its "
            "update counts, or goes back over steps whose privacy is already spent, which "
            "privacy.enabled does not account; use train.on_spike: warn (it only records)"
        )
    if t.compile is True:
        raise ConfigError(
            "train.compile: true cannot compile the per-example gradient hooks of "
            "privacy.enabled; set train.compile: false (or auto)"
        )


def refuse_unaccounted(cfg: Config, command: str) -> None:
    """``find-lr`` / ``find-batch`` on a private config: their steps read the training data
    without privacy, which the run's ε would not account. They run on data one may look at
    (public or synthetic, of the same kind) with privacy off, as DP practice has it."""
    if cfg.privacy.enabled:
        raise ConfigError(
            f"privacy.enabled: {command} measures on the training data without privacy, which "
            "the run's ε would not account; run it with privacy.enabled: false on public or "
            "synthetic data of the same kind (another data.path), then train privately at what "
            "it suggests"
        )
