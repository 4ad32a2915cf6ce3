"""`cadence explain`: integrated-gradients attributions of a run's prediction, and the command.

Completeness is checked against a bound derived for the quadrature, not a tolerance read off a
run. Captum integrates g(t) = dF(path(t))/dt over [0, 1] with n Gauss-Legendre nodes t_i and
weights w_i; the sum of the attributions is that rule's value, F(input) - F(baseline) the
integral. The rule is exact for polynomials of degree < 2n, so by Peano's kernel theorem its
error is the integral of K_k(s) g^(k)(s) ds for k = 1, 2, with K_1(s) = sum_{t_i > s} w_i -
(1 - s) and K_2(s) = sum w_i (t_i - s)_+ - (1 - s)^2 / 2, giving

    |error| <= sup|K_1| * TV(g)     (sup|K_1| <= max w_i: Chebyshev-Markov-Stieltjes)
    |error| <= sup|K_2| * TV(g')

The first holds for ReLU networks, whose g is piecewise constant; the second is the sharp one
for smooth models (the GPT). TV(g) and TV(g') are measured on a fine grid of the path by our
own autograd, and a float32 slack is added.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from resume_helpers import train_tiny_lm
from rich.console import Console
from safetensors.torch import save_model

import cadence
from cadence.cli.explain import add_parser
from cadence.config import ConfigError, dump_config
from cadence.data import DataError, load_digits, load_mnist
from cadence.deploy.explain import explain, explain_run
from cadence.deploy.explain_inputs import baseline_token
from cadence.deploy.explain_kinds import noise_like
from cadence.deploy.rundir import load_run
from cadence.workloads import build_model

# float32 rounding: F is O(10) (eps 6e-8 -> ~1e-6) and the attribution sums run over at most a
# few thousand terms of size <= 1 (sqrt(n) * eps * sum|a| ~ 1e-5); 1e-4 covers both tenfold.
FLOAT32_SLACK = 1e-4
GRID = 513  # points of the path on which TV(g) is measured


def quadrature_bound(steps: int, g: np.ndarray) -> float:
    """The smaller Peano bound (module docstring) on Captum's n-node Gauss-Legendre error."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    t, w = 0.5 * (nodes + 1.0), 0.5 * weights
    s = np.linspace(0.0, 1.0, 20 * steps + 1)[:, None]
    k2 = (w * np.clip(t - s, 0.0, None)).sum(1) - (1.0 - s[:, 0]) ** 2 / 2
    dg = np.diff(g) * (GRID - 1)  # g' on the grid
    first = w.max() * np.abs(np.diff(g)).sum()
    second = np.abs(k2).max() * np.abs(np.diff(dg)).sum()
    return float(min(first, second))


def path_derivative(forward, start: torch.Tensor, end: torch.Tensor, chunk: int = 64) -> np.ndarray:
    """g(t) = grad F(start + t (end - start)) . (end - start) on GRID points of [0, 1]."""
    d = (end - start).detach()
    out = []
    for ts in torch.linspace(0.0, 1.0, GRID, dtype=torch.float64).split(chunk):
        shape = (-1,) + (1,) * (d.dim() - 1)
        pts = (start + ts.to(d.dtype).view(shape) * d).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(forward(pts).sum(), pts)
        out.append((grad * d).flatten(1).sum(1).double())
    return torch.cat(out).numpy()


def _train(run_dir: Path, *overrides: str) -> Path:
    torch.set_num_threads(1)
    base = ["schedule.warmup=0", "train.progress=false", "train.threads=1", "batch.size=8"]
    steps = ["train.max_steps=3", "train.eval_every=3", "train.eval_samples=32"]
    cfg = cadence.load_config(None, [*base, *steps, *overrides])
    cadence.train(cfg, run_dir=run_dir, plots=False)
    return run_dir


def _hand_built(run_dir: Path, overrides: list[str], weights: dict[str, torch.Tensor]) -> Path:
    """A run directory whose model has the given weights (the rest as built)."""
    run_dir.mkdir(parents=True)
    cfg = cadence.load_config(None, ["schedule.warmup=0", *overrides])
    model = build_model(cfg)
    with torch.no_grad():
        for name, value in weights.items():
            model.get_parameter(name).copy_(value)
    save_model(model, str(run_dir / "model.safetensors"))
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_lm(tmp_path_factory.mktemp("explain") / "lm")


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (model.hf) as a run directory: its own tokenizer, its fresh weights."""
    import shutil

    from cadence.data.tokenizers import load_tokenizer
    from hf_models import HF_RUN, LLAMA, save_model_dir

    root = tmp_path_factory.mktemp("explain")
    model_dir = save_model_dir(root / "llama", LLAMA)
    run_dir = root / "run"
    run_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, run_dir / name)
    cfg = cadence.load_config(None, [*HF_RUN, f"model.hf={model_dir}"])
    model = build_model(cfg, vocab_size=load_tokenizer(run_dir).vocab_size)
    save_model(model, str(run_dir / "model.safetensors"))
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("explain") / "cnn", "workload=mnist", "model.arch=cnn")


@pytest.fixture(scope="module")
def speech_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two "words" as tones, a few steps of the narrow log-mel CNN."""
    root = tmp_path_factory.mktemp("explain")
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    for label, freq in (("high", 1200.0), ("low", 300.0)):
        (root / "data" / label).mkdir(parents=True)
        for s in range(4):
            x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.size)
            sf.write(root / "data" / label / f"s{s}_nohash_0.wav", x.astype(np.float32), 16000)
    return _train(
        root / "run",
        "workload=speech",
        f"data.path={root / 'data'}",
        "data.val_fraction=0.25",
        "model.channels=[8,16]",
        "batch.size=4",
    )


@pytest.fixture(scope="module")
def mnist_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    x, _ = load_mnist()
    path = tmp_path_factory.mktemp("explain") / "seven.png"
    Image.fromarray(np.round(x[0, 0].numpy() * 255).astype(np.uint8)).save(path)
    return path


# ---------------------------------------------------------------- completeness


@pytest.mark.parametrize("fixture", ["lm_run", "hf_run"])
def test_lm_attributions_add_up_to_the_log_probability_change(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    run = load_run(request.getfixturevalue(fixture))
    prompt = "def f(x):\n    return x"
    expl = explain(run, prompt, steps=50)
    model, tok = run.model, run.tokenizer
    ids = torch.from_numpy(tok.encode(prompt))[None]
    base = torch.full_like(ids, baseline_token(tok))
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0, -1], -1)
        goal = int(logp.argmax())
        at_base = float(torch.log_softmax(model(base)[0, -1], -1)[goal])
    assert expl.predicted == expl.target == tok.decode([goal])
    assert expl.attributions.shape == (ids.shape[1],)
    assert expl.tokens == [tok.decode([int(i)]) for i in ids[0]]
    want = float(logp[goal]) - at_base
    assert expl.at_input == pytest.approx(float(logp[goal]), abs=1e-5)
    assert expl.at_baseline == pytest.approx(at_base, abs=1e-5)

    emb = model.tok_emb if fixture == "lm_run" else model.hf.get_input_embeddings()

    def along(points: torch.Tensor) -> torch.Tensor:  # F with the embeddings replaced
        hook = emb.register_forward_hook(lambda m, i, o: points)
        try:
            return torch.log_softmax(model(ids.expand(len(points), -1))[:, -1], -1)[:, goal]
        finally:
            hook.remove()

    with torch.no_grad():
        start, end = emb(base), emb(ids)
    g = path_derivative(along, start, end)
    bound = quadrature_bound(50, g) + FLOAT32_SLACK
    gap = float(expl.attributions.sum()) - want
    assert abs(gap) <= bound, (gap, bound)
    assert expl.delta == pytest.approx(gap, abs=FLOAT32_SLACK)  # Captum's delta is that gap
    assert abs(want) > 10 * bound  # the check says something: the change dwarfs the error


def test_image_attributions_add_up_to_the_log_probability_change(
    cnn_run: Path, mnist_png: Path
) -> None:
    run = load_run(cnn_run)
    expl = explain(run, str(mnist_png), steps=50)
    x = torch.from_numpy(np.asarray(Image.open(mnist_png), dtype=np.float32) / 255.0)[None, None]
    model = run.model
    with torch.no_grad():
        logp = torch.log_softmax(model(x), -1)[0]
        goal = int(logp.argmax())
        at_black = float(torch.log_softmax(model(torch.zeros_like(x)), -1)[0, goal])
    assert expl.target == expl.predicted == str(goal)
    assert expl.predicted_prob == pytest.approx(float(logp[goal].exp()), rel=1e-5)
    assert expl.attributions.shape == (28, 28)
    np.testing.assert_allclose(expl.shown, x[0, 0].numpy(), atol=1e-7)  # the PNG as stored
    g = path_derivative(lambda v: torch.log_softmax(model(v), -1)[:, goal], torch.zeros_like(x), x)
    want = float(logp[goal]) - at_black
    gap = float(expl.attributions.sum()) - want
    assert abs(gap) <= quadrature_bound(50, g) + FLOAT32_SLACK, (gap, quadrature_bound(50, g))
    assert expl.delta == pytest.approx(gap, abs=FLOAT32_SLACK)
    # pixels of the black ground (0 in the input) have nothing to be credited with
    assert np.all(expl.attributions[x[0, 0].numpy() == 0.0] == 0.0)


def test_speech_heatmap_is_time_by_mel_and_adds_up(speech_run: Path, tmp_path: Path) -> None:
    t = np.arange(12000) / 16000
    wav = tmp_path / "high.wav"
    sf.write(wav, (0.3 * np.sin(2 * np.pi * 1200.0 * t)).astype(np.float32), 16000, "PCM_16")
    run = load_run(speech_run)
    expl = explain(run, str(wav), steps=50)
    from cadence.data.audio_files import read_wav
    from cadence.data.speech import fit_clip

    model = run.model
    audio = torch.from_numpy(fit_clip(read_wav(wav)))[None]
    noise = noise_like(audio)
    with torch.no_grad():
        mel = model.features(audio)
        logp = torch.log_softmax(model(audio), -1)[0]
        goal = int(logp.argmax())
        at_noise = float(torch.log_softmax(model(noise), -1)[0, goal])
        start, end = (model.normalise(model.features(a)).unsqueeze(1) for a in (noise, audio))
    assert expl.attributions.shape == expl.shown.shape == tuple(mel.shape[1:]) == (40, 101)
    assert expl.target == run.labels[goal]

    def along(points: torch.Tensor) -> torch.Tensor:  # F with the CNN's input replaced
        hook = model.body.register_forward_pre_hook(lambda m, args: (points,))
        try:
            return torch.log_softmax(model(audio.expand(len(points), -1)), -1)[:, goal]
        finally:
            hook.remove()

    g = path_derivative(along, start, end, chunk=32)
    want = float(logp[goal]) - at_noise
    gap = float(expl.attributions.sum()) - want
    assert abs(gap) <= quadrature_bound(50, g) + FLOAT32_SLACK, (gap, quadrature_bound(50, g))
    assert expl.delta == pytest.approx(gap, abs=FLOAT32_SLACK)


# ---------------------------------------------------------------- a known answer


def test_a_linear_model_is_credited_input_times_weight(tmp_path: Path) -> None:
    # The digits MLP without hidden layers is one Linear: logit_c(x) = W_c . x + b_c, whose
    # gradient is W_c everywhere, so IG from the black image is exactly x * W_c (the bias
    # cancels in F(x) - F(0)), whatever the step count: the rule's weights sum to 1.
    w = torch.linspace(-1.0, 1.0, 640).reshape(10, 64) * torch.arange(1, 11)[:, None]
    b = torch.arange(10, dtype=torch.float32) / 10
    run_dir = _hand_built(
        tmp_path / "linear",
        ["workload=digits", "model.hidden=[]"],
        {"net.0.weight": w, "net.0.bias": b},
    )
    x = load_digits()[0][5].numpy()
    np.save(tmp_path / "five.npy", x.reshape(8, 8))
    run = load_run(run_dir)
    for target, steps in (("3", 7), ("9", 50)):
        expl = explain(run, str(tmp_path / "five.npy"), target=target, steps=steps, score="logit")
        want = (x * w[int(target)].numpy()).reshape(8, 8)
        np.testing.assert_allclose(expl.attributions, want, rtol=1e-5, atol=1e-7)
        assert expl.at_input - expl.at_baseline == pytest.approx(want.sum(), rel=1e-5)

    # float64 logistic regression: one log-odds z = w . x + b for class 1, -z for class 0
    wl = torch.linspace(-2.0, 2.0, 30, dtype=torch.float64)
    run_dir = _hand_built(
        tmp_path / "logreg",
        ["workload=logreg"],
        {"linear.weight": wl[None], "linear.bias": torch.tensor([0.3], dtype=torch.float64)},
    )
    feats = np.random.default_rng(1).standard_normal(30)
    np.save(tmp_path / "row.npy", feats)
    run = load_run(run_dir)
    for target, sign in (("1", 1.0), ("0", -1.0)):
        expl = explain(run, str(tmp_path / "row.npy"), target=target, steps=5, score="logit")
        np.testing.assert_allclose(expl.attributions, sign * feats * wl.numpy(), rtol=1e-12)


# ---------------------------------------------------------------- the command


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`cadence explain ...` as cadence.cli.main runs it: a user error is one line, exit 2."""
    parser = argparse.ArgumentParser(prog="cadence")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["explain", *argv])
    try:
        code = args.func(args, Console(width=200))
    except (ConfigError, DataError) as exc:
        print(f"cadence: error: {exc}", file=sys.stderr)
        code = 2
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_writes_a_self_contained_page_for_a_prompt(
    lm_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(capsys, str(lm_run), "--input", "import sympy\nx = ")
    assert code == 0, err
    pages = list((lm_run / "explain").glob("prompt-*.html"))
    assert len(pages) == 1
    page = pages[0].read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<script" not in page.lower() and "http" not in page.lower()
    run = load_run(lm_run)
    ids = list(run.tokenizer.encode("import sympy\nx = "))
    with torch.no_grad():
        predicted = run.tokenizer.decode([int(run.model(torch.tensor([ids]))[0, -1].argmax())])
    # every token a shaded span, in order, newlines shown, the predicted token after them
    assert page.count('<span style="background') == len(ids)
    prompt = re.search(r'<div class="prompt">(.*?)</div>', page, re.S).group(1)
    assert html.unescape(re.sub(r"<[^>]+>", "", prompt)) == f"import sympy\u23cex = {predicted}"
    assert f"predicted {predicted!r}" in out and "convergence delta" in out
    assert "wrote" in out and str(pages[0]) in out

    code, out, err = cli(capsys, str(lm_run), "--input", "x = ", "--out", str(lm_run / "b.png"))
    assert code == 0, err
    with Image.open(lm_run / "b.png") as img:
        assert img.format == "PNG" and img.size[0] > 100


def test_cli_writes_a_png_beside_the_image(
    cnn_run: Path, mnist_png: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_png = tmp_path / "why.png"
    code, out, err = cli(capsys, str(cnn_run), "--input", str(mnist_png), "--out", str(out_png))
    assert code == 0, err
    with Image.open(out_png) as img:
        assert img.format == "PNG"
        img.load()
    expl = explain(load_run(cnn_run), str(mnist_png), steps=50)
    assert f"predicted {expl.predicted!r} (p = {expl.predicted_prob:.4f})" in out
    assert "pixel (row" in out
    # as a page: the picture inline, nothing fetched
    code, _, err = cli(
        capsys, str(cnn_run), "--input", str(mnist_png), "--out", str(tmp_path / "p.html")
    )
    assert code == 0, err
    page = (tmp_path / "p.html").read_text()
    assert "data:image/png;base64," in page and "http" not in page and "<script" not in page


def test_cli_explains_a_clip(speech_run: Path, tmp_path: Path, capsys) -> None:
    wav = tmp_path / "low.wav"
    t = np.arange(16000) / 16000
    sf.write(wav, (0.3 * np.sin(2 * np.pi * 300.0 * t)).astype(np.float32), 16000)
    code, out, err = cli(capsys, str(speech_run), "--input", str(wav), "--target", "low")
    assert code == 0, err
    png = speech_run / "explain" / "low-low.png"
    with Image.open(png) as img:
        assert img.format == "PNG"
    assert "explained 'low'" in out and "mel bin" in out


def _no_run(tmp_path: Path) -> Path:
    """A run folder whose training never wrote its weights."""
    run_dir = tmp_path / "unfinished"
    run_dir.mkdir()
    cfg = cadence.load_config(None, ["workload=digits"])
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir


BAD = [
    # (run, --input, more arguments, what the one line must say); TMP/ is the test's folder
    ("lm_run", "TMP/seven.png", [], "--input"),  # an image for a language model
    ("cnn_run", "a prompt for an image model", [], "--input"),
    ("cnn_run", "TMP/missing.png", [], "no such file"),
    ("cnn_run", "TMP/wide.png", [], "crop it square"),  # 30x20: no square to resize
    ("cnn_run", "TMP/x.wav", [], "--input"),  # audio for an image model
    ("lm_run", "x = ", ["--steps", "0"], "--steps"),
    ("lm_run", "x = ", ["--steps", "-3"], "--steps"),
    ("lm_run", "", [], "--input"),  # an empty prompt
    ("lm_run", "x" * 100, [], "context"),  # longer than the model's 32 tokens
    ("cnn_run", "TMP/seven.png", ["--target", "11"], "--target"),
    ("cnn_run", "TMP/seven.png", ["--out", "TMP/why.svg"], "--out"),
    (None, "TMP/x.npy", [], "model.safetensors: not found"),  # a run that did not finish
]


def _listing(folder: Path) -> set[Path]:
    return set(folder.rglob("*")) if folder.exists() else set()


@pytest.mark.parametrize(("fixture", "text", "extra", "needle"), BAD)
def test_bad_input_is_one_line_and_leaves_no_file(
    fixture, text, extra, needle, mnist_png, tmp_path, request, capsys
) -> None:
    run_dir = request.getfixturevalue(fixture) if fixture else _no_run(tmp_path)
    (tmp_path / "x.wav").write_bytes(b"RIFF")
    Image.open(mnist_png).save(tmp_path / "seven.png")
    Image.fromarray(np.zeros((20, 30), dtype=np.uint8)).save(tmp_path / "wide.png")
    np.save(tmp_path / "x.npy", np.zeros(64))
    before, inputs = _listing(run_dir / "explain"), _listing(tmp_path)
    out_dir = tmp_path / "out"
    argv = [str(run_dir), "--input", text, "--out", str(out_dir / "e.png"), *extra]
    code, out, err = cli(capsys, *(a.replace("TMP/", f"{tmp_path}/") for a in argv))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cadence: error: ") and needle in lines[0], err
    assert "Traceback" not in err and out == ""
    assert _listing(tmp_path) == inputs  # no output, no temporary file, no folder
    assert _listing(run_dir / "explain") == before


def test_asr_runs_are_refused_in_one_line(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "asr"
    run_dir.mkdir()
    cfg = cadence.load_config(None, ["workload=asr", "model.d_model=32", "model.n_layer=1"])
    save_model(build_model(cfg), str(run_dir / "model.safetensors"))
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    code, _, err = cli(capsys, str(run_dir), "--input", str(tmp_path / "a.wav"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "cannot be explained" in err and not (run_dir / "explain").exists()


def test_explain_run_returns_where_it_wrote(cnn_run: Path, mnist_png: Path) -> None:
    expl, path = explain_run(cnn_run, str(mnist_png), steps=8, target="3")
    assert path == cnn_run / "explain" / "seven-3.png" and path.is_file()
    assert expl.target == "3" and expl.steps == 8
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file
    json.dumps(expl.summary())  # plain strings
