"""`cadence export | generate | serve`: argument parsing and printing only.

The main CLI calls :func:`add_parsers` with its subparsers object; each handler has the signature
of ``cadence.cli.cmd_train`` (``handler(args, console) -> exit status``) and raises
``ConfigError`` for user errors, which the main CLI prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import time
from typing import Any

from rich.console import Console

__all__ = ["add_parsers", "cmd_export", "cmd_generate", "cmd_serve"]


def add_parsers(sub: Any) -> None:
    """Register ``export``, ``generate`` and ``serve`` on the main CLI's subparsers."""
    p = sub.add_parser(
        "export",
        help="export a run as safetensors, ONNX, the Hugging Face format, a peft adapter "
        "folder, or a Keras run as .keras, SavedModel or TFLite (checked vs PyTorch)",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `cadence train`")
    p.add_argument(
        "--format",
        required=True,
        choices=["safetensors", "onnx", "hf", "peft", "keras", "savedmodel", "tflite"],
        dest="fmt",
        help="hf: a folder transformers' from_pretrained loads (HF runs; cadence GPT with "
        "model.norm=layernorm, as GPT-NeoX); peft: a model.peft run's adapter folder, which "
        "PeftModel.from_pretrained loads onto the model.hf folder (the others merge them); "
        "keras, savedmodel, tflite: a Keras run (KERAS_BACKEND=torch) as files TensorFlow "
        "loads (model.keras, the SavedModel folder, model.tflite), checked in a TensorFlow "
        "process",
    )
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/export/FORMAT)")
    _add_weight_choice(p, "export model_ema.safetensors (train.ema)")
    p.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="also write a dynamic-int8 ONNX model for CPU and report its loss/accuracy change",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="generate text from a language-model run (KV cache)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="an lm run directory or safetensors export")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    _add_weight_choice(p, "use model_ema.safetensors")
    p.add_argument("--no-cache", action="store_true", help="recompute the context every token")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "serve",
        help="serve a run over HTTP (generation, chat, scoring or prediction)",
        description="Serve RUN_DIR over HTTP. Language models: /v1/generate, OpenAI's "
        "/v1/completions (generation and scoring: echo, logprobs), /v1/chat/completions and "
        "/v1/models, and the tokenizer at /tokenizer_info, /tokenize, /detokenize (which "
        "lm-evaluation-harness finds by itself); classifiers /v1/predict; speech recognisers "
        "/v1/transcribe; every model /health and /metrics. See docs/deploying.md.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory or safetensors export")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every endpoint but /health "
        "(default: $CADENCE_API_KEY; unset = no auth)",
    )
    _add_weight_choice(p, "serve model_ema.safetensors")
    p.add_argument("--max-new-tokens-limit", type=int, default=512, help="cap per request")
    p.add_argument("--max-batch", type=int, default=16, help="requests per forward pass")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.set_defaults(func=cmd_serve)


def _add_weight_choice(p: argparse.ArgumentParser, ema_help: str) -> None:
    """--ema and --checkpoint: which of a run's weights export, generate and serve load."""
    p.add_argument("--ema", action="store_true", help=ema_help)
    p.add_argument(
        "--lawa", action="store_true", help="use model_lawa.safetensors (train.lawa's average)"
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        metavar="CKPT",
        help="use a checkpoint instead of the final weights: latest, a step or a folder "
        "(sharded FSDP checkpoints are consolidated)",
    )


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    from cadence.deploy.export import export_run
    from cadence.deploy.export_keras import KERAS_FORMATS, export_keras

    t0 = time.perf_counter()
    try:
        result = (export_keras if args.fmt in KERAS_FORMATS else export_run)(
            args.run_dir,
            args.fmt,
            args.out,
            ema=args.ema,
            lawa=args.lawa,
            quantize=args.quantize,
            checkpoint=args.checkpoint,
        )
    except RuntimeError as exc:  # the parity check failed: not a user error, but no traceback
        print(f"cadence: {exc}", file=sys.stderr)
        return 1
    console.print(
        f"exported {args.fmt} to [bold]{result.out}[/] in {time.perf_counter() - t0:.1f} s"
    )
    console.print(f"  files: {', '.join(result.files)}")
    what = {
        "safetensors": "round trip",
        "onnx": "onnxruntime vs PyTorch",
        "hf": "from_pretrained vs PyTorch",
        "peft": "PeftModel.from_pretrained on the base vs PyTorch",
        "keras": "keras.models.load_model (TensorFlow) vs PyTorch",
        "savedmodel": "tf.saved_model.load(...).serve vs PyTorch",
        "tflite": "tf.lite.Interpreter vs PyTorch",
    }[args.fmt]
    console.print(
        f"  {what}: max abs diff {result.max_abs_diff:.3g} (tolerance {result.tolerance:g})"
    )
    q = result.quantization
    if q:
        line = (
            f"  int8: {q['bytes_int8'] / 1e6:.2f} MB (fp32 {q['bytes_fp32'] / 1e6:.2f} MB), "
            f"max abs diff {q['max_abs_diff_logits']:.3g}"
        )
        for key, name in (("val_loss", "val loss"), ("val_cer", "CER")):
            if f"{key}_change" in q:
                line += (
                    f", {name} {q[f'{key}_fp32']:.4f} -> {q[f'{key}_int8']:.4f} "
                    f"({q[f'{key}_change']:+.4f})"
                )
        if "val_accuracy_change" in q:
            line += (
                f", accuracy {q['val_accuracy_fp32']:.4f} -> {q['val_accuracy_int8']:.4f} "
                f"({q['val_accuracy_change']:+.4f})"
            )
        console.print(line + f" on {q['val_examples']} validation examples")
    return 0


def cmd_generate(args: argparse.Namespace, console: Console) -> int:
    from cadence.config import ConfigError
    from cadence.deploy.kinds import task_for
    from cadence.deploy.rundir import load_run
    from cadence.models.generate import SamplingParams, StreamDecoder, generate
    from cadence.workloads import ModelKind

    params = SamplingParams(
        args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed
    )
    try:
        params.check()
    except ValueError as exc:
        raise ConfigError(f"--{str(exc).replace('_', '-')}") from None
    run = load_run(args.run_dir, ema=args.ema, checkpoint=args.checkpoint, lawa=args.lawa)
    if run.kind is not ModelKind.LM:
        raise ConfigError(
            f"{args.run_dir}: {run.what} cannot generate text; "
            f"use `cadence serve` and {task_for(run).endpoint}"
        )
    prompt = [int(t) for t in run.tokenizer.encode(args.prompt)]  # type: ignore[union-attr]
    if not prompt:
        raise ConfigError("--prompt: must not be empty")
    decoder = StreamDecoder(run.tokenizer)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    t0, n = time.perf_counter(), 0
    for tok in generate(run.model, prompt, params, use_cache=not args.no_cache):  # type: ignore[arg-type]
        n += 1
        piece = decoder.push(tok)
        if piece:
            out.write(piece)
            out.flush()
    out.write(decoder.flush() + "\n")
    dt = time.perf_counter() - t0
    console.print(
        f"[dim]{n} tokens in {dt:.2f} s ({n / max(dt, 1e-9):.1f} tokens/s)[/]", highlight=False
    )
    return 0


def cmd_serve(args: argparse.Namespace, console: Console) -> int:
    import torch

    from cadence.config import ConfigError
    from cadence.deploy.rundir import load_run
    from cadence.deploy.serve import API_KEY_ENV, ServeSettings, serve

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port: must be in 0..65535, got {args.port}")
    if args.max_new_tokens_limit < 1 or args.max_batch < 1:
        raise ConfigError("--max-new-tokens-limit and --max-batch: must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # ConfigError -> one line, exit 2
    run = load_run(args.run_dir, ema=args.ema, checkpoint=args.checkpoint, lawa=args.lawa)
    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    try:
        public = not ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        public = args.host != "localhost"
    if public and not key:
        console.print(
            f"[yellow]warning:[/] binding {args.host} without an API key; anyone who can reach "
            f"it can use the model (set --api-key or ${API_KEY_ENV})"
        )
    settings = ServeSettings(
        max_new_tokens_limit=args.max_new_tokens_limit, max_batch=args.max_batch, api_key=key
    )
    console.print(
        f"serving {run.config.workload} from [bold]{run.path}[/] on http://{args.host}:{args.port} "
        f"({'auth on' if key else 'no auth'})"
    )
    serve(run, args.host, args.port, settings)
    return 0
