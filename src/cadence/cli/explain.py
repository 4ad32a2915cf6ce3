"""`cadence explain`: argument parsing and printing only (the library is cadence.deploy.explain).

The handler has the signature of the other commands (``handler(args, console) -> exit status``)
and raises ``ConfigError`` for user errors, which the main CLI prints as one line, exit status 2.
"""

from __future__ import annotations

import argparse

from rich.console import Console

from cadence.cli.deploy import _add_weight_choice

__all__ = ["add_parser", "cmd_explain"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``explain`` on the main CLI's subparsers."""
    p = sub.add_parser(
        "explain",
        help="attribute a run's prediction to its input (integrated gradients): prompt "
        "tokens, image pixels or time x mel regions of a clip, as an HTML page or a PNG",
        description="Explain one prediction of RUN_DIR's model with integrated gradients "
        "(Captum): how much each prompt token (language models), pixel (mnist, digits), "
        "feature (logreg) or time x mel region of a clip (speech) moved the explained "
        "output away from its value at a baseline: a 'no text' token at every position, a "
        "black image, all-zero features, white noise. The attributions add up to "
        "F(input) - F(baseline); the printed convergence delta is how far they miss it.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory or safetensors export")
    p.add_argument(
        "--input",
        required=True,
        metavar="INPUT",
        help="the prompt itself (language models); a PNG/JPEG or .npy (mnist, digits; ink "
        "bright on black, as the data); a .npy of features (logreg); a WAV clip (speech)",
    )
    p.add_argument(
        "--target",
        default=None,
        help="what to explain instead of the prediction: text whose first token is used "
        "(language models), or a class index or name (classifiers)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=50,
        help="integration steps (default 50; more if delta is large)",
    )
    p.add_argument(
        "--score",
        choices=["logprob", "logit"],
        default="logprob",
        help="the output explained: the target's log-probability (default) or its logit",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help="FILE.html (a self-contained page) or FILE.png (default: "
        "RUN_DIR/explain/NAME.html for prompts, .png otherwise)",
    )
    p.add_argument("--top", type=int, default=8, metavar="K", help="parts listed on the console")
    _add_weight_choice(p, "explain model_ema.safetensors")
    p.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace, console: Console) -> int:
    from rich.markup import escape
    from rich.table import Table

    from cadence.deploy.explain import explain_run

    expl, path = explain_run(
        args.run_dir,
        args.input,
        out=args.out,
        target=args.target,
        steps=args.steps,
        score=args.score,
        ema=args.ema,
        lawa=args.lawa,
        checkpoint=args.checkpoint,
    )
    for line in expl.summary():
        console.print(escape(line), highlight=False)
    table = Table()
    table.add_column("largest attributions")
    table.add_column(f"share of {expl.score_label}", justify="right")
    for name, value in expl.top(max(args.top, 0)):
        table.add_row(escape(name), f"{value:+.4g}")
    console.print(table)
    console.print(f"wrote [bold]{escape(str(path))}[/]")
    return 0
