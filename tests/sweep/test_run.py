"""Running sweeps: resume, refusal of a different sweep, shards and merge,
and one real sweep end to end."""

import json
import os
import types

import numpy as np
import pytest

from jaxrep.core.errors import ConfigError
from jaxrep.sweep import run as run_lib
from jaxrep.sweep import store
from jaxrep.sweep.grid import Spec


class Killed(Exception):
  pass


def _fake_run(calls, kill_at=None):
  """A stand-in for protocol.run whose summary is a function of the config
  (so tables can be compared); raises Killed at the kill_at-th call."""

  def run(config, progress=False, dataset=None):
    if kill_at is not None and len(calls) == kill_at:
      raise Killed()
    calls.append((config.malicious, config.seed))
    tpr = (config.seed % 3) / 2 + config.malicious / 10
    return types.SimpleNamespace(
        config=config, wall_seconds=1.0 + config.seed,
        malicious=np.array([True, False]), flagged_at=np.array([5, -1]),
        replicated_subruns=[5, 7],
        summary=lambda: {"tpr": tpr, "fpr": 0.0, "overhead_steps": 10})
  return run


SPEC = Spec.parse(grid="malicious=1,2", seeds="0:3", fixed={"steps": 100})


def test_killed_sweep_resumes_only_missing_cells_with_the_same_table(
    tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(run_lib.protocol, "run", _fake_run(calls, kill_at=4))
  with pytest.raises(Killed):
    run_lib.sweep(SPEC, str(tmp_path / "a"), progress=False)
  assert len(store.read_cells(str(tmp_path / "a" / store.CELLS))) == 4
  # A torn last line (killed while writing) is dropped and its cell rerun.
  with open(tmp_path / "a" / store.CELLS, "a") as f:
    f.write('{"cell": "trunc')
  calls.clear()
  monkeypatch.setattr(run_lib.protocol, "run", _fake_run(calls))
  messages = []
  run_lib.sweep(SPEC, str(tmp_path / "a"), progress=False,
                log=messages.append)
  assert calls == [(2, 1), (2, 2)]
  assert messages == ["resuming: 4 of 6 cells already finished"]
  lines = (tmp_path / "a" / store.CELLS).read_text().splitlines()
  assert len(lines) == 6 and all(json.loads(l) for l in lines)
  record = json.loads(lines[0])
  assert record["summary"]["first_look_tpr"] == 1.0
  assert record["command"].startswith("python -m jaxrep.simulate ")
  assert "--malicious=1" in record["command"] and "--seed=0" in record[
      "command"]

  calls.clear()
  run_lib.sweep(SPEC, str(tmp_path / "b"), progress=False)
  assert len(calls) == 6
  for name in ("table.csv", "table.md"):
    assert ((tmp_path / "a" / name).read_text() ==
            (tmp_path / "b" / name).read_text())
  assert os.path.exists(tmp_path / "a" / "by_malicious.png")


def test_a_different_sweep_in_the_same_out_is_refused(tmp_path, monkeypatch):
  monkeypatch.setattr(run_lib.protocol, "run", _fake_run([]))
  run_lib.sweep(SPEC, str(tmp_path), progress=False)
  other = Spec.parse(grid="malicious=1,3", seeds="0:3", fixed={"steps": 100})
  with pytest.raises(ConfigError, match="holds a different sweep .*axes"):
    run_lib.sweep(other, str(tmp_path), progress=False)


def test_bad_cell_is_refused_before_anything_trains(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(run_lib.protocol, "run", _fake_run(calls))
  bad = Spec.parse(grid="malicious=2,40", seeds="0", fixed={"steps": 100})
  with pytest.raises(ConfigError, match="cell malicious=40: malicious: 40"):
    run_lib.sweep(bad, str(tmp_path), progress=False)
  text = Spec.parse(grid="target_label=3,12", fixed={"steps": 100})
  with pytest.raises(ConfigError, match="cell target_label=12: target_label"):
    run_lib.sweep(text, str(tmp_path), progress=False)
  assert calls == [] and not os.path.exists(tmp_path / store.CELLS)


def test_shards_split_the_cells_and_merge_gives_the_whole_table(
    tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(run_lib.protocol, "run", _fake_run(calls))
  out = str(tmp_path / "sharded")
  run_lib.sweep(SPEC, out, shard=(0, 2), progress=False)
  first = list(calls)
  notes = []
  run_lib.merge(out, log=notes.append)
  assert notes == ["note: 3 of 6 cells have not finished; the tables hold "
                   "the others"]
  run_lib.sweep(SPEC, out, shard=(1, 2), progress=False)
  assert len(first) == 3 and sorted(calls) == sorted(
      (m, s) for m in (1, 2) for s in range(3))
  run_lib.merge(out, log=notes.append)
  run_lib.sweep(SPEC, str(tmp_path / "whole"), progress=False)
  assert ((tmp_path / "sharded" / "table.csv").read_text() ==
          (tmp_path / "whole" / "table.csv").read_text())


def test_parse_shard():
  assert store.parse_shard("1/4") == (1, 4)
  assert store.parse_shard(None) is None
  for bad in ("4/4", "x", "1/0", "-1/2"):
    with pytest.raises(ConfigError, match="^shard: "):
      store.parse_shard(bad)


def test_a_real_sweep_records_each_cells_summary(tmp_path):
  spec = Spec.parse(grid="malicious=1", seeds="0:2", fixed=dict(
      providers=4, steps=20, subrun_steps=10, replicated=1,
      attack_check=False, max_train=400, probe_size=32))
  run_lib.sweep(spec, str(tmp_path), progress=False)
  records = sorted(store.read_cells(str(tmp_path / store.CELLS)).values(),
                   key=lambda r: r["index"])
  assert [r["seed"] for r in records] == [0, 1]
  for r in records:
    assert r["config"]["providers"] == 4 and r["config"]["model"] == "mlp"
    assert 0.0 <= r["summary"]["final_clean_accuracy"] <= 1.0
    assert r["summary"]["overhead_replication_steps"] == 30
  header = (tmp_path / "table.csv").read_text().splitlines()[0]
  assert header.startswith("malicious,seeds,tpr_mean")


TINY = dict(providers=4, steps=20, subrun_steps=10, replicated=1,
            attack_check=False, max_train=400, probe_size=32)


def _summaries(out):
  return {r["cell"]: {k: v for k, v in r["summary"].items()
                      if k != "wall_seconds"}
          for r in store.all_cells(out).values()}


def test_workers_run_the_shards_in_processes_with_the_same_cells(tmp_path):
  spec = Spec.parse(grid="malicious=1", seeds="0:3", fixed=TINY,
                    figures=("tpr", "fpr", "final_clean_accuracy"))
  out = str(tmp_path / "workers")
  argv = ["--grid=malicious=1", "--seeds=0:3", "--figures=tpr,fpr,"
          "final_clean_accuracy", f"--out={out}"] + [
              f"--{k}={v}".lower() if isinstance(v, bool) else f"--{k}={v}"
              for k, v in TINY.items()]
  argv = [a.replace("--attack_check=false", "--noattack_check") for a in argv]
  run_lib.sweep_workers(spec, out, argv, 2, progress=False)
  # Each worker wrote its own shard (cell index mod 2), the parent the tables.
  for i, n in ((0, 2), (1, 1)):
    assert len(store.read_cells(os.path.join(
        out, f"shard-{i}-of-2", store.CELLS))) == n
  run_lib.sweep(spec, str(tmp_path / "one"), progress=False)
  assert _summaries(out) == _summaries(str(tmp_path / "one"))
  assert ((tmp_path / "workers" / "table.csv").read_text() ==
          (tmp_path / "one" / "table.csv").read_text())
  # Finished anywhere counts: the same sweep in one process runs nothing.
  messages = []
  run_lib.sweep(spec, out, progress=False, log=messages.append)
  assert messages == ["resuming: 3 of 3 cells already finished"]


def test_a_failing_worker_is_named_with_its_last_line(tmp_path, monkeypatch):
  monkeypatch.setattr(run_lib.protocol, "run", _fake_run([]))
  out = str(tmp_path)
  with pytest.raises(run_lib.WorkerError,
                     match=r"worker 0/2 exited with status 2 \(error: .*"
                           r"no_such_flag.*shard-0-of-2/worker.log"):
    run_lib.sweep_workers(SPEC, out, ["--no_such_flag=1"], 2,
                          progress=False)
  with pytest.raises(ConfigError, match="^workers: must be an integer >= 1"):
    run_lib.sweep_workers(SPEC, out, [], 0, progress=False)


def test_threads_give_the_same_cells_and_tables_and_resume(tmp_path,
                                                           monkeypatch):
  """Cells side by side in threads: a failing cell stops the sweep (the
  cells not started are not run), a re-run finishes the rest, and the
  tables equal a one-thread sweep's."""
  calls = []
  monkeypatch.setattr(run_lib.protocol, "run", _fake_run(calls, kill_at=2))
  out = str(tmp_path / "threads")
  with pytest.raises(Killed):
    run_lib.sweep(SPEC, out, progress=False, threads=2)
  first = len(store.read_cells(os.path.join(out, store.CELLS)))
  assert 1 <= first < 6
  calls.clear()
  monkeypatch.setattr(run_lib.protocol, "run", _fake_run(calls))
  run_lib.sweep(SPEC, out, progress=False, threads=2)
  assert len(calls) == 6 - first
  run_lib.sweep(SPEC, str(tmp_path / "one"), progress=False)
  for name in ("table.csv", "table.md"):
    assert ((tmp_path / "threads" / name).read_text() ==
            (tmp_path / "one" / name).read_text())
  for bad in (0, 1.5, -2):
    with pytest.raises(ConfigError, match="^threads: must be an integer"):
      run_lib.sweep(SPEC, out, progress=False, threads=bad)


def test_real_cells_in_threads_equal_cells_run_alone(tmp_path):
  spec = Spec.parse(grid="malicious=1,2", seeds="0:2", fixed=TINY,
                    figures=("tpr", "fpr", "final_clean_accuracy"))
  run_lib.sweep(spec, str(tmp_path / "two"), progress=False, threads=2)
  run_lib.sweep(spec, str(tmp_path / "one"), progress=False)
  two, one = _summaries(str(tmp_path / "two")), _summaries(
      str(tmp_path / "one"))
  assert len(one) == 4 and two == one
