"""Chat data prepared to shards (`prepare-data --format chat`) and packed windows.

References: a run on the JSONL itself (the prepared folder must give it the same samples and
so the same run), each conversation scored alone (a packed window must score each as alone),
and an uninterrupted run (kill -9 and resume)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from resume_helpers import (
    TINY_LM,
    assert_same_run,
    kill_twice_then_resume,
    rows,
    run_cli,
    train_reference,
)

import cadence
from cadence.data import DataError
from cadence.data.prepare_chat import prepare_chat
from cadence.workloads import build_workload
from cadence.workloads.chat import IGNORE
from cli_helpers import as_sets

pytestmark = pytest.mark.usefixtures("one_thread")

CHAT = [*TINY_LM, "model.seq_len=160", "data.format=chat", "train.log_every=1"]


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory) -> Path:
    """Sums in chat form, of varied lengths (a system turn now and then, two questions)."""
    rng = random.Random(0)
    lines = []
    for i in range(60):
        a, b = rng.randint(0, 999), rng.randint(0, 99)
        messages = [{"role": "system", "content": "add"}] if i % 3 == 0 else []
        messages += [
            {"role": "user", "content": f"{a}+{b}"},
            {"role": "assistant", "content": str(a + b)},
        ]
        if i % 4 == 0:
            messages += [
                {"role": "user", "content": f"{b}+{b}"},
                {"role": "assistant", "content": str(2 * b)},
            ]
        lines.append(json.dumps({"messages": messages}))
    path = tmp_path_factory.mktemp("chat") / "sums.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def prepared(jsonl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "sums"
    # shards of 100 tokens: every stream spans several files
    prepare_chat([jsonl], out, fmt="chat", val_fraction=0.2, shard_tokens=100, progress=False)
    return out


def _workload(path: Path, *extra: str):
    cfg = cadence.load_config(None, [*CHAT, f"data.path={path}", "data.val_fraction=0.2", *extra])
    return build_workload(cfg)


def test_a_prepared_folder_gives_the_samples_of_its_jsonl(jsonl, prepared):
    index = json.loads((prepared / "index.json").read_text())
    assert index["data_format"] == "chat"
    assert len(list(prepared.glob("train-0*.bin"))) > 1  # the stream spans shards
    assert index["splits"]["train"]["examples"] + index["splits"]["val"]["examples"] == 60
    for packing in ("false", "true"):
        mem = _workload(jsonl, f"data.packing={packing}")
        disk = _workload(prepared, f"data.packing={packing}")
        assert (mem.n_train, mem.val_size) == (disk.n_train, disk.val_size)
        idx = torch.arange(mem.n_train)
        for a, b in zip(mem.batch(idx), disk.batch(idx)):
            assert torch.equal(a, b)
        assert mem.batch_units(idx) == disk.batch_units(idx) > 0
        torch.manual_seed(0)
        assert mem.evaluate(mem.model) == pytest.approx(disk.evaluate(mem.model))
    assert disk.prefetch and not mem.prefetch
    assert (prepared / "chat_template.jinja").read_text() == mem.extras["chat_template"]


def test_a_packed_window_scores_each_conversation_as_if_alone(jsonl):
    w = _workload(jsonl, "data.packing=true")
    rowwise = _workload(jsonl)
    assert w.n_train < rowwise.n_train  # several conversations share a window
    pack = int(np.argmax(np.diff(w.packs)))  # the fullest window
    first, last = int(w.packs[pack]), int(w.packs[pack + 1])
    x, y, seg = w.batch(torch.tensor([pack]))
    assert int(seg.max()) >= last - first - 1 >= 1
    alone = sum(
        rowwise.loss_sum(rowwise.model, rowwise.batch(torch.tensor([i])))
        for i in range(first, last)
    )
    w.model.load_state_dict(rowwise.model.state_dict())
    packed_loss = w.loss_sum(w.model, (x, y, seg))
    assert float(packed_loss) == pytest.approx(float(alone), rel=1e-5)
    # the units agree: each conversation's first token is never a target, padding never is
    singles = sum(rowwise.batch_units(torch.tensor([i])) for i in range(first, last))
    assert w.units((x, y, seg)) == w.batch_units(torch.tensor([pack])) == singles
    # and the packed targets are each conversation's own, in order
    kept = [rowwise.batch(torch.tensor([i]))[1] for i in range(first, last)]
    want = torch.cat([k[k != IGNORE] for k in kept])
    assert torch.equal(y[y != IGNORE], want)
    # without segments the conversations would see each other: the logits differ
    assert not torch.allclose(w.model(x), w.model(x, segments=seg))
    ref = F.cross_entropy(w.model(x, segments=seg).flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    assert float(ref) * w.units((x, y, seg)) == pytest.approx(float(packed_loss), rel=1e-5)


def test_sigkill_then_resume_on_packed_prepared_data_is_bitwise(tmp_path, prepared):
    args = [
        *CHAT,
        f"data.path={prepared}",
        "data.packing=true",
        "batch.size=2",
        "train.max_steps=14",
        "train.checkpoint_every=3",
    ]
    train_reference(args, tmp_path / "straight")
    cmd = ["train", *as_sets(args), "--run-dir", str(tmp_path / "run")]
    kill_twice_then_resume(cmd, tmp_path / "run", seed=5)
    assert_same_run(tmp_path / "straight", tmp_path / "run", range(1, 15))
    assert rows(tmp_path / "run")[-1]["train_loss"] > 0


def test_prepare_data_chat_cli_and_its_refusals(tmp_path, jsonl):
    out = tmp_path / "p"
    res = run_cli("prepare-data", str(jsonl), "--format", "chat", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "conversations" in res.stdout and "data.format=chat" in res.stdout
    # text training refuses a chat folder, and chat training a text folder, in one line
    with pytest.raises(DataError, match="holds conversations .* data.format: chat"):
        build_workload(cadence.load_config(None, [*TINY_LM, f"data.path={out}"]))
    text_dir = tmp_path / "t"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n" * 2000)
    assert run_cli("prepare-data", str(corpus), "--out", str(text_dir)).returncode == 0
    with pytest.raises(DataError, match="prepared from text"):
        _workload(text_dir)
    # a bad line: one line naming the file and line, exit 2, nothing left behind
    bad = tmp_path / "bad.jsonl"
    bad.write_text(jsonl.read_text().splitlines()[0] + '\n{"messages": [{"role": "bot"}]}\n')
    res = run_cli("prepare-data", str(bad), "--format", "chat", "--out", str(tmp_path / "b"))
    assert res.returncode == 2 and f"{bad}:2:" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "b").exists()
    res = run_cli("prepare-data", str(corpus), "--format", "chat", "--out", str(tmp_path / "c"))
    assert res.returncode == 2 and "reads .jsonl files" in res.stderr
    assert not (tmp_path / "c").exists()


def test_packing_is_for_conversations(tmp_path):
    from cadence.config import ConfigError

    with pytest.raises(ConfigError, match="data.packing: packs conversations"):
        cadence.load_config(None, [*TINY_LM, "data.packing=true"])
