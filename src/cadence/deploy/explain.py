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
- the keyword classifier: time x mel regions of the normalised log-mel spectrogram its CNN reads.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cadence.config import ConfigError
from cadence.deploy.explain_inputs import baseline_token, read_array, read_clip, read_prompt
from cadence.deploy.kinds.classifier import AUDIO
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
    "explain",
    "explain_run",
]

DEFAULT_STEPS = 50
MAX_STEPS = 10_000
SCORES = ("logprob", "logit")
OUT_SUFFIXES = (".html", ".png")
# Interpolation points per forward pass: memory stays flat in --steps, the sums do not change.
POINTS_PER_PASS = 16


class View(str, enum.Enum):
    """How an explanation is laid out: the shape of its attributions and what they sit on."""

    TOKENS = "tokens"  # one value per prompt token
    IMAGE = "image"  # (height, width), beside the image
    FEATURES = "features"  # one value per input feature
    SPECTROGRAM = "spectrogram"  # (mel bins, frames), beside the log-mel spectrogram


@dataclass
class Explanation:
    """The attributions of one prediction and the numbers that say how far to trust them."""

    view: View
    attributions: np.ndarray  # summed over embedding dims for tokens; else the input's shape
    predicted: str  # the model's top token or class
    predicted_prob: float
    target: str  # the token or class explained (the prediction unless --target)
    target_prob: float
    score: str  # "logprob" or "logit": what F is
    at_input: float  # F(input), by a plain forward pass
    at_baseline: float  # F(baseline)
    delta: float  # Captum's: sum(attributions) - (F(input) - F(baseline))
    steps: int
    baseline: str  # the baseline, in words
    tokens: list[str] = field(default_factory=list)  # TOKENS: each token's text
    shown: np.ndarray | None = None  # the image, features or log-mel the values sit on
    seconds_per_frame: float = 0.0  # SPECTROGRAM: the hop between frames

    @property
    def score_label(self) -> str:
        return "log p" if self.score == "logprob" else "logit"

    def unit_names(self) -> list[str]:
        """A name per attribution, in the order of ``attributions.ravel()``."""
        a = self.attributions
        if self.view is View.TOKENS:
            return [f"{i}: {t!r}" for i, t in enumerate(self.tokens)]
        if self.view is View.FEATURES:
            return [f"feature {i}" for i in range(a.size)]
        if self.view is View.IMAGE:
            return [f"pixel (row {r}, col {c})" for r, c in np.ndindex(*a.shape)]
        return [
            f"{f * self.seconds_per_frame:.2f} s, mel bin {m}" for m, f in np.ndindex(*a.shape)
        ]

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` parts with the largest attributions by magnitude, largest first."""
        flat = self.attributions.ravel()
        names = self.unit_names()
        order = np.argsort(-np.abs(flat), kind="stable")[:k]
        return [(names[i], float(flat[i])) for i in order]

    def summary(self) -> list[str]:
        """The lines the console and the HTML page both show."""
        total = float(self.attributions.sum())
        return [
            f"predicted {self.predicted!r} (p = {self.predicted_prob:.4f}); "
            f"explained {self.target!r} (p = {self.target_prob:.4f})",
            f"{self.score_label} = {self.at_input:.4f} at the input, {self.at_baseline:.4f} at "
            f"the baseline ({self.baseline})",
            f"integrated gradients, {self.steps} steps: attributions sum to {total:.4f}, "
            f"convergence delta {self.delta:.2g}",
        ]


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


def _pick(logits: torch.Tensor, target: int, score: str) -> torch.Tensor:
    """F per example: the target's log-probability or logit. One logit per example (logistic
    regression) is class 1's log-odds: class 0's is its negation."""
    if logits.dim() == 1:
        z = logits if target == 1 else -logits
        return nn.functional.logsigmoid(z) if score == "logprob" else z
    if score == "logprob":
        return torch.log_softmax(logits, dim=-1)[:, target]
    return logits[:, target]


def _probs(logits: torch.Tensor) -> np.ndarray:
    """One example's class probabilities, from (C,) logits or one log-odds."""
    z = logits.detach().double()
    if z.dim() == 0:
        p1 = torch.sigmoid(z)
        return torch.stack([1 - p1, p1]).numpy()
    return torch.softmax(z, dim=-1).numpy()


def _integrate(
    forward: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    baselines: torch.Tensor,
    steps: int,
    layer: nn.Module | None = None,
    layer_input: bool = False,
) -> tuple[np.ndarray, float]:
    """Attributions to ``inputs``, or to ``layer``'s output (input with ``layer_input``), and
    Captum's delta for the one example.

    With a layer the path runs between the layer's values that ``inputs`` and ``baselines``
    produce, so a baseline can be chosen in the model's own input space (token ids, audio).
    """
    from captum.attr import IntegratedGradients, LayerIntegratedGradients

    kwargs = dict(
        baselines=baselines,
        n_steps=steps,
        internal_batch_size=POINTS_PER_PASS,
        return_convergence_delta=True,
    )
    if layer is None:
        attr, delta = IntegratedGradients(forward).attribute(inputs, **kwargs)
    else:
        method = LayerIntegratedGradients(forward, layer)
        attr, delta = method.attribute(inputs, attribute_to_layer_input=layer_input, **kwargs)
    return attr.detach().double().numpy()[0], float(delta.sum())


def _token_text(tokenizer: object, token: int) -> str:
    """A token as text; a byte that is part of a longer character is shown as ``\\xNN``."""
    piece = tokenizer.decode([token])  # type: ignore[attr-defined]
    if "\ufffd" in piece and hasattr(tokenizer, "token_bytes"):
        return tokenizer.token_bytes(token).decode("latin-1").encode("unicode_escape").decode()
    return piece


def _explain_prompt(
    run: LoadedRun, text: str, target: str | None, steps: int, score: str
) -> Explanation:
    """The prompt's tokens, for the model's next token, through the embedding layer.

    The path starts from the prompt with every token replaced by :func:`baseline_token`'s, not
    from the zero embedding: the zero vector is where RMSNorm and LayerNorm divide by
    sqrt(eps), so every scaled copy t * e of an embedding normalises to nearly the same vector
    once t passes sqrt(eps) / rms(e). The whole change of the output then happens in a sliver
    of the path that no quadrature samples, and completeness fails by most of the difference
    (about 70% of it at 200 steps on a tiny cadence GPT), while from a "no text" token it
    holds to float rounding at 50.
    """
    tok, model = run.tokenizer, run.model
    ids = torch.tensor([read_prompt(run, text)])
    with torch.no_grad():
        probs = _probs(model(ids)[0, -1])
    predicted = int(probs.argmax())
    goal = predicted
    if target is not None:
        wanted = tok.encode(target)  # type: ignore[union-attr]
        if len(wanted) == 0:
            raise ConfigError("--target: empty; give the text whose first token to explain")
        goal = int(wanted[0])

    def forward(x: torch.Tensor) -> torch.Tensor:
        return _pick(model(x)[:, -1], goal, score)

    base_id = baseline_token(tok)
    base = torch.full_like(ids, base_id)
    attr, delta = _integrate(forward, ids, base, steps, layer=_embedding(model))
    return Explanation(
        view=View.TOKENS,
        attributions=attr.sum(axis=-1),  # per token: completeness holds for the sums too
        predicted=_token_text(tok, predicted),
        predicted_prob=float(probs[predicted]),
        target=_token_text(tok, goal),
        target_prob=float(probs[goal]),
        score=score,
        **_ends(forward, ids, base),
        delta=delta,
        steps=steps,
        baseline=f"token {_token_text(tok, base_id)!r} at every position",
        tokens=[_token_text(tok, int(i)) for i in ids[0]],
    )


def _embedding(model: nn.Module) -> nn.Module:
    """The token-embedding table of cadence's GPT or of a Hugging Face model."""
    table = getattr(model, "tok_emb", None)
    if table is None and hasattr(model, "hf"):
        table = model.hf.get_input_embeddings()
    if not isinstance(table, nn.Module):
        raise ConfigError(f"{type(model).__name__}: has no token embedding to explain through")
    return table


def _ends(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, base: torch.Tensor
) -> dict[str, float]:
    """F at both ends of the path, each by its own forward pass."""
    with torch.no_grad():
        return {"at_input": float(forward(x)[0]), "at_baseline": float(forward(base)[0])}


def _class_index(run: LoadedRun, target: str | None, n: int, predicted: int) -> int:
    """``--target`` as a class: an index, or one of the run's class names."""
    if target is None:
        return predicted
    names = run.labels or []
    if target in names:
        return names.index(target)
    if target.isdigit() and int(target) < n:
        return int(target)
    known = f" or one of {', '.join(names)}" if names else ""
    raise ConfigError(
        f"--target: {target!r} is not a class of {run.what}; give an index 0..{n - 1}{known}"
    )


def _explain_classifier(
    run: LoadedRun, text: str, target: str | None, steps: int, score: str
) -> Explanation:
    """Pixels, features, or the keyword classifier's time x mel regions, for one class."""
    model = run.model
    audio = run.config.workload in AUDIO
    x = read_clip(run, text) if audio else read_array(run, text)
    with torch.no_grad():
        probs = _probs(model(x)[0])
    predicted = int(probs.argmax())
    goal = _class_index(run, target, len(probs), predicted)

    def forward(v: torch.Tensor) -> torch.Tensor:
        return _pick(model(v), goal, score)

    base = torch.zeros_like(x)
    names = run.labels or [str(i) for i in range(len(probs))]
    common = dict(
        predicted=names[predicted],
        predicted_prob=float(probs[predicted]),
        target=names[goal],
        target_prob=float(probs[goal]),
        score=score,
        steps=steps,
        **_ends(forward, x, base),
    )
    if audio:
        return _explain_clip(model, forward, x, base, steps, common)
    attr, delta = _integrate(forward, x, base, steps)
    if run.config.workload == "logreg":
        shown = x[0].double().numpy()
        return Explanation(
            View.FEATURES, attr, delta=delta, baseline="all features 0", shown=shown, **common
        )
    side = int(round(np.sqrt(attr.size)))
    image = x[0].double().numpy().reshape(side, side)
    return Explanation(
        View.IMAGE,
        attr.reshape(side, side),
        delta=delta,
        baseline="a black image",
        shown=image,
        **common,
    )


def _explain_clip(
    model: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    audio: torch.Tensor,
    silence: torch.Tensor,
    steps: int,
    common: dict,
) -> Explanation:
    """Time x mel regions of the normalised log-mel, the CNN's input (``model.body``'s).

    Not the raw log-mel: the model normalises it per utterance, and the path from silence's
    constant log-mel would cross that division by sqrt(var + eps) at var = 0, where the
    output changes all at once (as an embedding's norm does at zero). After normalisation
    silence is all zeros, every bin at the clip's own mean level, and the path from there to
    the clip is smooth; attributions then say which time x frequency regions, above or below
    the clip's mean energy, moved the class score.
    """
    body, front = getattr(model, "body", None), getattr(model, "features", None)
    if body is None or front is None:
        raise ConfigError(f"{type(model).__name__}: not a log-mel CNN; cannot explain it")
    attr, delta = _integrate(forward, audio, silence, steps, layer=body, layer_input=True)
    with torch.no_grad():
        logmel = front(audio)[0].double().numpy()
    return Explanation(
        View.SPECTROGRAM,
        attr[0],  # (1, mel, frames): the CNN's one input channel
        delta=delta,
        baseline="silence (normalised log-mel all 0)",
        shown=logmel,
        seconds_per_frame=front.hop_length / front.sample_rate,
        **common,
    )


# One line per kind of model: (run, input, target, steps, score) -> Explanation. A kind without
# one (the CTC speech recogniser) is refused with the kinds that have one.
EXPLAINERS: dict[ModelKind, Callable[..., Explanation]] = {
    ModelKind.LM: _explain_prompt,
    ModelKind.CLASSIFIER: _explain_classifier,
}


def explain(
    run: LoadedRun,
    input: str,
    *,
    target: str | None = None,
    steps: int = DEFAULT_STEPS,
    score: str = "logprob",
) -> Explanation:
    """Attribute ``run``'s prediction for ``input`` (a prompt or a file name, as --input)."""
    check_options(steps, score, None)
    explainer = EXPLAINERS.get(run.kind)
    if explainer is None:
        kinds = " or a ".join(k.noun for k in EXPLAINERS)
        raise ConfigError(
            f"{run.path}: {run.what} cannot be explained yet; explain takes a {kinds} run"
        )
    run.model.requires_grad_(False)  # gradients reach the input alone: no graph for weights
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
