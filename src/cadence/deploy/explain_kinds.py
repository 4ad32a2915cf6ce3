"""How each kind of model is explained: what is attributed, from which baseline, for what.

Each explainer takes ``(run, input, target, steps, score)`` and returns an
:class:`~cadence.deploy.explain_result.Explanation`; :data:`cadence.deploy.explain.EXPLAINERS`
maps the kinds of model to them. Baselines are chosen so the path to the input is smooth: a
model that normalises its input (RMSNorm on embeddings, per-clip log-mel normalisation,
GroupNorm) changes all at once near a zero baseline, and integrated gradients then miss most of
the difference they are meant to split (the docstrings below say where).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from cadence.config import ConfigError
from cadence.deploy.explain_inputs import (
    IMAGE_SIDES,
    baseline_token,
    read_array,
    read_clip,
    read_prompt,
)
from cadence.deploy.explain_result import Explanation, View
from cadence.deploy.kinds.classifier import AUDIO
from cadence.deploy.rundir import LoadedRun

__all__ = ["POINTS_PER_PASS", "explain_classifier", "explain_prompt", "noise_like"]

# Interpolation points per forward pass: memory stays flat in --steps, the sums do not change.
POINTS_PER_PASS = 16


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


def explain_prompt(
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


def explain_classifier(
    run: LoadedRun, text: str, target: str | None, steps: int, score: str
) -> Explanation:
    """Pixels, features, or the keyword classifier's time x mel regions, for one class."""
    model = run.model
    audio = run.config.workload in AUDIO
    x = read_clip(run, text) if audio else read_array(run, text)
    base = noise_like(x) if audio else torch.zeros_like(x)
    with torch.no_grad():
        probs = _probs(model(x)[0])
    predicted = int(probs.argmax())
    goal = _class_index(run, target, len(probs), predicted)

    def forward(v: torch.Tensor) -> torch.Tensor:
        return _pick(model(v), goal, score)

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
    side = IMAGE_SIDES.get(run.config.workload)
    if side is None:  # a feature vector (standardised: 0 is the training mean)
        shown = x[0].double().numpy()
        return Explanation(
            View.FEATURES, attr, delta=delta, baseline="all features 0", shown=shown, **common
        )
    image = x[0].double().numpy().reshape(side, side)
    return Explanation(
        View.IMAGE,
        attr.reshape(side, side),
        delta=delta,
        baseline="a black image",
        shown=image,
        **common,
    )


def noise_like(audio: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The keyword classifier's baseline: white noise at the clip's level, the same every run.

    Not silence: the model normalises each clip's log-mel to zero mean and unit variance, so
    it cannot tell a clip from a quieter copy of it, and its first block normalises again
    (GroupNorm). Along the path from silence, t * clip looks like the clip itself for all but
    the smallest t: the whole change of the output sits in a sliver at t = 0 that no
    quadrature samples, and completeness fails by more than the difference itself. White
    noise has a flat spectrum and no word in it, and the path from it to the clip is smooth.
    """
    g = torch.Generator().manual_seed(seed)
    level = float(audio.double().pow(2).mean().sqrt()) or 0.1
    return (torch.randn(audio.shape, generator=g, dtype=torch.float64) * level).to(audio.dtype)


def _explain_clip(
    model: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    audio: torch.Tensor,
    noise: torch.Tensor,
    steps: int,
    common: dict,
) -> Explanation:
    """Time x mel regions of the normalised log-mel spectrogram, the CNN's input
    (``model.body``'s): the path runs there, from the noise's spectrogram to the clip's, so
    each value is a region's share in what sets the clip apart from noise for this class."""
    body, front = getattr(model, "body", None), getattr(model, "features", None)
    if body is None or front is None:
        raise ConfigError(f"{type(model).__name__}: not a log-mel CNN; cannot explain it")
    attr, delta = _integrate(forward, audio, noise, steps, layer=body, layer_input=True)
    with torch.no_grad():
        logmel = front(audio)[0].double().numpy()
    return Explanation(
        View.SPECTROGRAM,
        attr[0],  # (1, mel, frames): the CNN's one input channel
        delta=delta,
        baseline="white noise at the clip's level",
        shown=logmel,
        seconds_per_frame=front.hop_length / front.sample_rate,
        **common,
    )
