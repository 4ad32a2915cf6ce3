"""`cadence tune` with a study shared by several workers: PostgreSQL and a journal file.

Workers are the real CLI in child processes (forked: cli_helpers.ForkedCLI), run at the same time
on one study through `--storage` and `--study`, on the logistic-regression workload with a few
dozen steps per trial. The test reads the study back with Optuna itself, and each worker's
tune.json. PostgreSQL is the server `postgres_url` gives (conftest.py: CADENCE_TEST_POSTGRES, or
one started here; skipped without one, failed under CI); each test has a study of its own.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from cadence.tune.shared_study import counted
from cli_helpers import ForkedCLI, run_forked

pytestmark = pytest.mark.usefixtures("plots_off")

WORKERS = 2
TOTAL = 12  # the study's trials, all workers together
CONFIG = {
    "workload": "logreg",
    "optimizer": {"name": "sgd", "lr": 0.1},
    "batch": {"size": 32},
    "train": {"max_steps": 20, "eval_every": 10, "progress": False},
    "search": {"optimizer.lr": {"low": 1.0e-3, "high": 1.0, "log": True}},
}
# Trials of a tenth of a second: long enough that every worker gets some of them.
SHORT = ["--set", "train.max_steps=200", "--set", "train.eval_every=100"]
# Long enough trials (about a second) that a worker is caught in the middle of one.
SLOW = ["--set", "train.max_steps=2000", "--set", "train.eval_every=1000", "--pruner", "none"]
HEARTBEAT_S = 1  # a dead worker's trial is stale after 2 s
TIMEOUT_S = 180


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


@pytest.fixture(params=["postgresql", "journal"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "journal":
        return f"journal:{tmp_path / 'study.log'}"
    return request.getfixturevalue("postgres_url")


def worker(config: Path, run_dir: Path, storage: str, study: str, *args: str) -> ForkedCLI:
    return ForkedCLI(
        "tune", str(config), "--storage", storage, "--study", study, "--run-dir", str(run_dir),
        *args,
    )  # fmt: skip


def finish(proc: ForkedCLI) -> str:
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}"
    return out


def load(storage: str, study: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=_optuna_storage(storage)).get_trials()


def _optuna_storage(storage: str) -> Any:
    if storage.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(storage[len("journal:") :]))
    return storage.replace("postgresql://", "postgresql+psycopg://", 1)


def rows(run_dir: Path) -> list[dict[str, Any]]:
    return json.loads((run_dir / "tune.json").read_text())["trials"]


def study_name() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def test_workers_together_run_the_study_total_each_trial_once(config, storage, tmp_path):
    study = study_name()
    procs = [
        worker(config, tmp_path / f"w{i}", storage, study, "--study-trials", str(TOTAL), *SHORT)
        for i in range(WORKERS)
    ]
    for p in procs:
        finish(p)
    trials = load(storage, study)
    assert [t.number for t in trials] == list(range(TOTAL))  # none lost, none extra
    assert all(t.state.is_finished() and t.state.name != "FAIL" for t in trials)
    assert len({t.params["optimizer.lr"] for t in trials}) == TOTAL  # no trial run twice
    pids = {str(p.pid) for p in procs}
    assert {t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials} == pids
    # Every worker's outputs describe the whole study, the same one.
    for i in range(WORKERS):
        mine = rows(tmp_path / f"w{i}")
        assert [r["number"] for r in mine] == list(range(TOTAL))
        assert [r["params"] for r in mine] == [t.params for t in trials]
        assert all(r["retry_of"] is None and r["retried_by"] is None for r in mine)
        data = json.loads((tmp_path / f"w{i}" / "tune.json").read_text())
        assert data["n_study_trials"] == TOTAL and len(data["workers"]) == WORKERS
        assert (tmp_path / f"w{i}" / "best.yaml").is_file()


def test_a_killed_workers_trial_is_retried_and_counted_once(config, storage, tmp_path):
    total = 4
    study = study_name()
    args = ["--study-trials", str(total), "--heartbeat", str(HEARTBEAT_S), *SLOW]
    victim, survivor = (
        worker(config, tmp_path / name, storage, study, *args) for name in ("victim", "survivor")
    )
    dead = _running_trial_of(victim.pid, storage, study)
    victim.kill()
    assert victim.wait(timeout=TIMEOUT_S) == -9
    finish(survivor)

    trials = load(storage, study)
    by_number = {t.number: t for t in trials}
    assert by_number[dead.number].state.name == "FAIL"
    assert by_number[dead.number].params == dead.params
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert retry[0].params == dead.params
    assert retry[0].user_attrs["worker"].endswith(f":{survivor.pid}")
    # The study's total counts the retry in place of the dead trial: nothing twice.
    assert len(counted(trials)) == total and len(trials) == total + 1
    assert all(t.state.name == "COMPLETE" for t in counted(trials))
    table = {r["number"]: r for r in rows(tmp_path / "survivor")}
    assert table[retry[0].number]["retry_of"] == dead.number
    assert table[dead.number]["retried_by"] == retry[0].number
    assert table[dead.number]["worker"].endswith(f":{victim.pid}")


def _running_trial_of(pid: int, storage: str, study: str) -> optuna.trial.FrozenTrial:
    """Poll the study until worker ``pid`` is in the middle of a trial."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            trials = load(storage, study)
        except KeyError:  # the study is not created yet
            trials = []
        for t in trials:
            worker_attr = str(t.user_attrs.get("worker", ""))
            # params set: the worker is past sampling, into training
            if t.state.name == "RUNNING" and worker_attr.endswith(f":{pid}") and t.params:
                return t
        time.sleep(0.02)
    raise AssertionError(f"worker {pid} never ran a trial")


def test_the_same_command_resumes_the_study(config, postgres_url, tmp_path):
    first, total = 3, 6
    study = study_name()
    run = tmp_path / "run"
    finish(worker(config, run, postgres_url, study, "--study-trials", str(first)))
    before = load(postgres_url, study)
    assert len(before) == first
    out = finish(worker(config, run, postgres_url, study, "--study-trials", str(total)))
    assert f"trial {total}/{total}" in out
    after = load(postgres_url, study)
    assert [t.number for t in after] == list(range(total))
    for old, new in zip(before, after):
        assert (old.params, old.value, old.state) == (new.params, new.value, new.state)
    assert [r["number"] for r in rows(run)] == list(range(total))


def test_ctrl_c_queues_the_trial_again_for_the_resumed_study(config, tmp_path):
    total = 2
    storage, study = f"journal:{tmp_path / 'study.log'}", study_name()
    args = ["--study-trials", str(total), "--heartbeat", str(HEARTBEAT_S), *SLOW]
    proc = worker(config, tmp_path / "run", storage, study, *args)
    stopped = _running_trial_of(proc.pid, storage, study)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 130 and "interrupted" in err, err
    queued = load(storage, study)[-1]
    assert queued.state.name == "WAITING" and queued.params == stopped.params
    assert queued.system_attrs["failed_trial"] == stopped.number

    finish(worker(config, tmp_path / "run", storage, study, *args))  # the same command again
    trials = load(storage, study)
    retry = {t.number: t for t in trials}[queued.number]
    assert retry.state.name == "COMPLETE" and retry.params == stopped.params
    assert [t.state.name for t in counted(trials)] == ["COMPLETE"] * total


def test_bad_storage_is_one_line_and_writes_nothing(config, tmp_path):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o500)
    # root writes into a read-only folder; /proc takes no new files from anyone
    unwritable = "/proc" if _writable(read_only) else str(read_only)
    cases = {
        "postgresql://bob:hunter2@127.0.0.1:1/x": "cannot open the database",
        f"journal:{unwritable}/study.log": "cannot write",
        f"journal:{tmp_path / 'missing' / 'study.log'}": "does not exist",
        "foo://": "unknown database 'foo'",
    }
    for spec, message in cases.items():
        run = tmp_path / "run"
        res = run_forked(
            "tune", str(config), "--trials", "1", "--storage", spec, "--run-dir", str(run)
        )
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2, (spec, res.stderr)
        assert len(lines) == 1 and lines[0].startswith("cadence: error: --storage "), lines
        assert message in lines[0], lines[0]
        assert "hunter2" not in res.stderr + res.stdout  # the password is masked
        assert not run.exists()
    assert list(read_only.iterdir()) == [] and not (tmp_path / "missing").exists()


def _writable(folder: Path) -> bool:
    probe = folder / "probe"
    try:
        probe.touch()
    except OSError:
        return False
    probe.unlink()
    return True


def test_a_database_lost_mid_study_is_one_line_and_exit_1(config, tmp_path, monkeypatch, capsys):
    """The server going away mid-study (seen by hand: PostgreSQL stopped under a running worker)
    reaches the trial loop as a chain: psycopg's error, SQLAlchemy's OperationalError, Optuna's
    StorageInternalError, and then an error of Optuna's own loop (UnboundLocalError in Optuna
    5.1) with the rest as its context. The CLI finds the database error in the chain."""
    import psycopg
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import OperationalError

    from cadence.cli import main as cadence_main

    refused = 'connection failed: connection to server at "127.0.0.1", port 1 failed'

    def lost(*args: object, **kwargs: object) -> None:
        db = OperationalError("SELECT 1", {}, psycopg.OperationalError(refused))
        commit = StorageInternalError("An exception is raised during the commit.")
        commit.__cause__ = db
        loop = UnboundLocalError("cannot access local variable 'updated_state'")
        loop.__context__ = commit
        raise loop

    monkeypatch.setattr("cadence.tune.sweep.run_sweep", lost)
    journal = f"journal:{tmp_path / 'study.log'}"
    argv = ["tune", str(config), "--study-trials", "2", "--storage", journal, "--run-dir"]
    rc = cadence_main([*argv, str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith(f"cadence: error: --storage {journal}: the study's database failed")
    assert refused in err[0] and "run the same command again to resume" in err[0]

    def bug(*args: object, **kwargs: object) -> None:
        raise UnboundLocalError("a bug of ours, not the database's")

    monkeypatch.setattr("cadence.tune.sweep.run_sweep", bug)
    with pytest.raises(UnboundLocalError):  # anything else is not hidden
        cadence_main([*argv, str(tmp_path / "out2")])
