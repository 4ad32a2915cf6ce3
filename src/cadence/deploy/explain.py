"""`cadence explain`: which parts of one input a trained run's prediction rests on.

Integrated gradients (Sundararajan et al., 2017, as Captum implements it) credits each part of
the input with its share of F(input) - F(baseline), where F is the explained output (the
log-probability of a token or class, or its logit) and the baseline an input that carries no
evidence. The shares add up to that difference exactly in the limit of many steps
(completeness), and the gap at the chosen step count is reported as Captum's convergence delta,
so a user can see whether the attributions can be trusted or need more ``--steps``.

What is attributed, per kind of model (:data:`EXPLAINERS`):

- language models: the prompt's tokens, through their embeddings, for the next token;
- image classifiers: the pixels (baseline: a black image, the empty ground of MNIST and digits);
- the tabular classifier: its features (baseline: all zero, the training mean once standardised);
- the keyword classifier: time x mel regions of the normalised log-mel spectrogram its CNN
  reads (baseline: white noise; :func:`cadence.deploy.explain_kinds.noise_like` says why
  not silence).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

from cadence.config import ConfigError
from cadence.deploy.explain_kinds import explain_classifier, explain_prompt
from cadence.deploy.explain_result import Explanation, View
from cadence.deploy.rundir import LoadedRun, load_run
from cadence.workloads import ModelKind

__all__ = [
    "DEFAULT_STEPS",
    "EXPLAINERS",
    "MAX_STEPS",
    "SCORES",
    "Explanation",
    "View",
    "check_options",
    "default_out",
    "explain",
    "explain_run",
]

DEFAULT_STEPS = 50
MAX_STEPS = 10_000
SCORES = ("logprob", "logit")
OUT_SUFFIXES = (".html", ".png")


def check_options(steps: int, score: str, out: str | Path | None) -> None:
    """The options that need no model, checked before one is loaded or a file written."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ConfigError(
            f"--steps: must be an integer from 1 to {MAX_STEPS}, got {steps}; "
            f"{DEFAULT_STEPS} is usually enough (the convergence delta says)"
        )
    if score not in SCORES:
        raise ConfigError(f"--score: must be one of {', '.join(SCORES)}, got {score!r}")
    if out is not None and Path(out).suffix.lower() not in OUT_SUFFIXES:
        raise ConfigError(f"--out: {out} must end in .html (a page) or .png (a picture)")


# One line per kind of model: (run, input, target, steps, score) -> Explanation. A kind without
# one (the CTC speech recogniser) is refused with the kinds that have one.
EXPLAINERS: dict[ModelKind, Callable[..., Explanation]] = {
    ModelKind.LM: explain_prompt,
    ModelKind.CLASSIFIER: explain_classifier,
}


def explain(
    run: LoadedRun,
    input: str,
    *,
    target: str | None = None,
    steps: int = DEFAULT_STEPS,
    score: str = "logprob",
) -> Explanation:
    """Attribute ``run``'s prediction for ``input`` (a prompt or a file name, as --input).

    The run's model is left with ``requires_grad`` off: gradients are needed for the input
    alone, and a graph through every weight would only cost memory.
    """
    check_options(steps, score, None)
    explainer = EXPLAINERS.get(run.kind)
    if explainer is None:
        kinds = " or a ".join(k.noun for k in EXPLAINERS)
        raise ConfigError(
            f"{run.path}: {run.what} cannot be explained yet; explain takes a {kinds} run"
        )
    run.model.requires_grad_(False)
    return explainer(run, input, target, steps, score)


def default_out(run_dir: Path, input: str, view: View, target: str | None) -> Path:
    """``RUN_DIR/explain/NAME.html`` for prompts, ``.png`` otherwise; NAME says what it is of."""
    path = Path(input)
    if view is not View.TOKENS and path.is_file():
        name = path.stem
    else:
        name = "prompt-" + hashlib.sha1(input.encode()).hexdigest()[:8]
    if target is not None:
        name += "-" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", target).strip("_.") or "target")[:24]
    return run_dir / "explain" / (name + (".html" if view is View.TOKENS else ".png"))


def explain_run(
    run_dir: str | Path,
    input: str,
    *,
    out: str | Path | None = None,
    target: str | None = None,
    steps: int = DEFAULT_STEPS,
    score: str = "logprob",
    ema: bool = False,
    lawa: bool = False,
    checkpoint: str | None = None,
) -> tuple[Explanation, Path]:
    """Load a run, explain one input, write the page or picture (``out``'s suffix says which)
    atomically; every user error is raised before anything is written."""
    from cadence.deploy.explain_views import write_explanation

    check_options(steps, score, out)
    run = load_run(run_dir, ema=ema, checkpoint=checkpoint, lawa=lawa)
    expl = explain(run, input, target=target, steps=steps, score=score)
    path = Path(out) if out is not None else default_out(run.path, input, expl.view, target)
    write_explanation(expl, path)
    return expl, path
