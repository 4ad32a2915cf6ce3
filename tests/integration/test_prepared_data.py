"""Training from a prepared corpus (`cadence prepare-data` -> `data.path: DIR`).

What a window holds is checked against the token stream read directly from the shards; the
sampling order against its definition (every packed window once per epoch; random offsets a
function of seed and sample index); resume against the uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from resume_helpers import assert_same_run, kill_twice_then_resume, run_cli, train_reference

import cadence
from cadence.data import DataError, RandomOffsets
from cadence.data.prepare import prepare_corpus
from cadence.data.shards import open_prepared
from cadence.workloads import build_workload
from cli_helpers import as_sets

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 16
RUN = [
    "workload=lm",
    "model.n_layer=1",
    "model.d_model=32",
    "model.n_head=2",
    f"model.seq_len={SEQ}",
    "batch.size=4",
    "schedule.warmup=2",
    "train.eval_samples=8",
    "train.eval_every=5",
    "train.threads=1",
    "train.progress=false",
    "train.log_every=1",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small folder of real code (the json and email packages' sources), prepared."""
    import email
    import json as json_pkg

    src = tmp_path_factory.mktemp("src")
    for pkg in (json_pkg, email):
        for f in sorted(Path(pkg.__file__).parent.glob("*.py")):
            (src / f"{pkg.__name__}_{f.name}").write_text(f.read_text())
    out = tmp_path_factory.mktemp("prepared") / "corpus"
    prepare_corpus([src], out, tokenizer="byte", val_fraction=0.1, progress=False)
    return out


def workload(corpus: Path, *overrides: str):
    cfg = cadence.load_config(None, [*RUN, f"data.path={corpus}", *overrides])
    return cfg, build_workload(cfg)


def test_a_packed_epoch_reads_every_training_window_once(corpus):
    cfg, w = workload(corpus)
    stream = open_prepared(corpus).train
    assert w.n_train == stream.n_tokens // (SEQ + 1)
    epoch = w.sampler(cfg.train.seed).indices(0, w.n_train)
    x, y = w.batch(epoch)
    blocks = torch.cat([x, y[:, -1:]], dim=1).numpy()
    # Each window id once per epoch, and window i is tokens [i*(L+1), (i+1)*(L+1)) of the
    # stream: the epoch reads every training token once (the last partial window aside).
    assert sorted(epoch.tolist()) == list(range(w.n_train))
    whole = stream.read(0, w.n_train * (SEQ + 1)).reshape(w.n_train, SEQ + 1)
    np.testing.assert_array_equal(blocks, whole[epoch.numpy()])
    assert stream.n_tokens - w.n_train * (SEQ + 1) < SEQ + 1


def test_random_windows_are_a_function_of_seed_and_sample_index(corpus):
    cfg, w = workload(corpus, "data.sampling=random")
    sampler = w.sampler(cfg.train.seed)
    assert isinstance(sampler, RandomOffsets)
    first = sampler.indices(0, 64)
    # Resuming at sample 40 draws the same windows without drawing the first 40.
    assert torch.equal(w.sampler(cfg.train.seed).indices(40, 24), first[40:])
    assert not torch.equal(w.sampler(cfg.train.seed + 1).indices(0, 64), first)
    stream = open_prepared(corpus).train
    assert int(first.max()) <= stream.n_tokens - (SEQ + 1)
    x, y = w.batch(first[:3])
    for row, start in zip(torch.cat([x, y[:, -1:]], 1).numpy(), first[:3].tolist()):
        np.testing.assert_array_equal(row, stream.read(start, SEQ + 1))


def test_evaluation_windows_are_fixed_and_do_not_depend_on_the_seed(corpus):
    _, a = workload(corpus, "train.seed=0")
    _, b = workload(corpus, "train.seed=7", "data.sampling=random")
    assert a.n_val == 8 and np.array_equal(a.val_starts(), b.val_starts())
    assert a.val_starts().max() + SEQ + 1 <= open_prepared(corpus).val.n_tokens
    assert len(set(a.val_starts().tolist())) == 8  # spread, not one window eight times


def test_training_from_a_prepared_corpus_learns_and_keeps_its_tokenizer(tmp_path, corpus):
    cfg = cadence.load_config(None, [*RUN, f"data.path={corpus}", "train.max_steps=30"])
    summary = cadence.train(cfg, run_dir=tmp_path / "run", plots=False)
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["train_loss"] < logged[0]["train_loss"] - 1.0
    assert summary["final_metrics"]["val_loss"] < np.log(256)
    assert (tmp_path / "run" / "tokenizer.json").is_file()


@pytest.mark.parametrize("sampling,prefetch", [("packed", "false"), ("random", "true")])
def test_sigkill_then_resume_is_bitwise_the_uninterrupted_run(tmp_path, corpus, sampling, prefetch):
    """The interrupted run of the random case also reads its batches in the background: the
    numbers are those of the plain, uninterrupted run all the same."""
    args = [*RUN, f"data.path={corpus}", f"data.sampling={sampling}", "train.max_steps=24"]
    args += ["train.checkpoint_every=3"]
    train_reference(args, tmp_path / "straight")
    args.append(f"train.prefetch={prefetch}")
    cmd = ["train", *as_sets(args), "--run-dir", str(tmp_path / "run")]
    kill_twice_then_resume(cmd, tmp_path / "run", seed=5)
    assert_same_run(tmp_path / "straight", tmp_path / "run", range(1, 25))


def test_a_truncated_shard_or_a_missing_index_is_one_line_naming_the_file(tmp_path, corpus):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(corpus, broken)
    shard = sorted(broken.glob("train-*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-2])
    res = run_cli(
        "train", *as_sets([*RUN, f"data.path={broken}"]), "--run-dir", str(tmp_path / "r")
    )
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert str(shard) in lines[0] and "truncated" in lines[0]
    assert not (tmp_path / "r").exists()
    (broken / "index.json").unlink()
    with pytest.raises(DataError, match="prepare-data"):
        open_prepared(broken)


def test_random_sampling_is_for_token_streams():
    assert cadence.load_config(None, ["data.sampling=random"]).data.sampling == "random"
    with pytest.raises(cadence.ConfigError, match="data.sampling: random windows .* lm workload"):
        cadence.load_config(None, ["workload=digits", "data.sampling=random"])


def test_an_hf_model_trains_on_data_prepared_with_its_own_tokenizer(tmp_path, corpus):
    import email

    from hf_models import LLAMA, save_model_dir

    llama = save_model_dir(tmp_path / "llama", LLAMA)
    ours = tmp_path / "ours"
    prepare_corpus([email.__path__[0]], ours, tokenizer=str(llama), progress=False)
    run = tmp_path / "run"
    cfg = cadence.load_config(
        None, [*RUN, f"model.hf={llama}", f"data.path={ours}", "train.max_steps=5"]
    )
    cadence.train(cfg, run_dir=run, plots=False)
    assert json.loads((run / "tokenizer_config.json").read_text())["eos_token"] == "<|eos|>"
    # The byte-level corpus was not prepared with the model's tokenizer: refused, not trained.
    cfg = cadence.load_config(None, [*RUN, f"model.hf={llama}", f"data.path={corpus}"])
    with pytest.raises(cadence.ConfigError, match="prepared with another tokenizer"):
        cadence.train(cfg, run_dir=tmp_path / "bad", plots=False)
    assert not (tmp_path / "bad").exists()


def test_a_run_on_prepared_data_exports_and_quantises(tmp_path, corpus):
    from cadence.deploy.export import export_run

    cfg = cadence.load_config(None, [*RUN, f"data.path={corpus}", "train.max_steps=3"])
    cadence.train(cfg, run_dir=tmp_path / "run", plots=False)
    result = export_run(tmp_path / "run", "onnx", quantize="int8")
    assert result.max_abs_diff <= result.tolerance
    q = result.quantization
    # Scored on 64 validation windows spread through the split (there are more than 64).
    assert q["val_examples"] == 64 and np.isfinite(q["val_loss_int8"])
