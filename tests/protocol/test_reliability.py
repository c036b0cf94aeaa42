"""Reliability: resume after SIGKILL, hostile provider output, hostile input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jaxrep import data as data_lib
from jaxrep.protocol import hostile
from jaxrep import protocol
from jaxrep.config import SimConfig
from jaxrep import report
from jaxrep.core.errors import ConfigError
from jaxrep import config as config_lib
from jaxrep.population import build as population_lib

KNOWN_FLAGS = config_lib.flag_names() | set(population_lib.OPTIONS)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN = ["--providers=6", "--malicious=2", "--steps=120", "--subrun_steps=20",
       "--replicated=3", "--poison_rate=0.2", "--seed=3", "--noprogress"]


def _simulate(args, **kw):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.Popen([sys.executable, "-m", "jaxrep.simulate", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env, cwd=ROOT, **kw)


def _results(path):
  res = json.loads(open(os.path.join(path, "results.json")).read())
  res["summary"].pop("wall_seconds")
  # Measured at start-up (free memory now), like the wall time; the plan it
  # leads to (chunks) stays compared.
  res["memory"].pop("budget_mib")
  res["notes"] = [n for n in res["notes"] if not n.startswith("resumed")]
  return res


def _checkpoints(out):
  d = os.path.join(out, "checkpoints")
  return sorted(int(x) for x in os.listdir(d) if x.isdigit()) \
      if os.path.isdir(d) else []


def test_sigkill_mid_run_then_resume_is_bitwise_identical(tmp_path):
  ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
  p = _simulate(RUN + [f"--out={ref}"])
  assert p.wait(timeout=600) == 0, p.stderr.read()[-2000:]

  p = _simulate(RUN + [f"--out={killed}"])
  deadline = time.time() + 600
  while time.time() < deadline and not any(s >= 2 for s in _checkpoints(killed)):
    time.sleep(0.05)
    assert p.poll() is None, "finished before it could be killed"
  p.send_signal(signal.SIGKILL)
  p.wait()
  done = _checkpoints(killed)
  assert done and max(done) < 5, done        # really stopped mid-run
  assert not os.path.exists(os.path.join(killed, "results.json"))

  p = _simulate(RUN + [f"--out={killed}"])
  assert p.wait(timeout=600) == 0, p.stderr.read()[-2000:]
  resumed = json.loads(open(os.path.join(killed, "results.json")).read())
  assert any(n.startswith("resumed at sub-run") for n in resumed["notes"])
  assert _results(killed) == _results(ref)


def test_resuming_with_another_config_is_refused(tmp_path):
  ds = data_lib.load_dataset("digits")
  cfg = SimConfig.from_flat(providers=4, malicious=1, steps=40, replicated=1,
                           attack_check=False)
  protocol.run(cfg, progress=False, dataset=ds, workdir=str(tmp_path))
  other = SimConfig.from_flat(providers=4, malicious=1, steps=40, replicated=1,
                             attack_check=False, seed=4)
  with pytest.raises(ConfigError, match="another config.*seed"):
    protocol.run(other, progress=False, dataset=ds, workdir=str(tmp_path))
  # --noresume starts over instead.
  r = protocol.run(other, progress=False, dataset=ds, workdir=str(tmp_path),
                   resume=False)
  assert not any(n.startswith("resumed") for n in r.notes)


def test_results_json_is_written_atomically(tmp_path, monkeypatch):
  path = str(tmp_path / "results.json")
  report.write_json_atomic(path, {"a": 1})

  class Boom(Exception):
    pass

  def explode(*a, **k):
    raise Boom()
  monkeypatch.setattr(json, "dump", explode)
  with pytest.raises(Boom):
    report.write_json_atomic(path, {"a": 2})
  assert json.loads(open(path).read()) == {"a": 1}   # old file intact
  assert os.listdir(tmp_path) == ["results.json"]    # no temp file left


def test_hostile_providers_are_flagged_with_reasons_and_harm_no_one():
  ds = data_lib.load_dataset("digits")
  base = dict(providers=10, malicious=2, steps=100, subrun_steps=20,
              replicated=2, poison_rate=0.2, attack_check=False)
  clean = protocol.run(SimConfig.from_flat(**base), progress=False, dataset=ds)
  # The attackers are drawn from the seed; four benign providers turn
  # hostile in the second run (same seed, same attackers).
  attackers = [int(i) for i in np.flatnonzero(clean.malicious)]
  benign = [int(i) for i in np.flatnonzero(~clean.malicious)]
  nan, inf, div, shape = benign[:4]
  bad = protocol.run(SimConfig.from_flat(
      **base, hostile=f"{nan}:nan,{inf}:inf,{div}:diverged,"
      f"{shape}:wrong_shape"), progress=False, dataset=ds)
  np.testing.assert_array_equal(bad.malicious, clean.malicious)
  reasons = {i: p["flag_reason"] for i, p in enumerate(bad.providers())}
  assert "NaN or Inf" in reasons[nan] and "NaN or Inf" in reasons[inf]
  assert "diverged" in reasons[div]
  assert "wrong shape" in reasons[shape]
  assert all(bad.flagged_at[i] == 0 for i in benign[:4])
  s = bad.summary()
  assert s["tpr"] == 1.0 and s["fpr"] == 0.0 and s["hostile_flagged"] == 4
  # The others' distances stay finite; benign replicas stay close.
  others = attackers + benign[4:]
  honest = benign[4:]
  for d in bad.matrices:
    sub = d[np.ix_(others, others)]
    assert np.all(np.isfinite(sub))
    bb = d[np.ix_(honest, honest)][~np.eye(len(honest), dtype=bool)]
    assert np.all(bb > 0) and bb.max() < 1e-3 * d[attackers[0], honest[0]]
  assert np.isfinite(s["final_clean_accuracy"])
  assert s["final_clean_accuracy"] == pytest.approx(
      clean.summary()["final_clean_accuracy"], abs=0.02)


def test_neutralized_rows_do_not_change_other_distances():
  import jax.numpy as jnp
  from jaxrep import distances
  rng = np.random.default_rng(0)
  base = rng.normal(size=(1, 300)).astype(np.float32)
  rows = base + 1e-4 * rng.normal(size=(8, 300)).astype(np.float32)
  rows[:2] += rng.normal(size=(2, 300)).astype(np.float32)
  start = {"w": jnp.zeros(300)}
  params = {"w": jnp.asarray(rows)}
  tampered, odd = hostile.tamper(params, {3: "nan", 4: "diverged",
                                          5: "wrong_shape"})
  reasons = hostile.check_returned(start, tampered, odd, np.ones(8, bool))
  assert sorted(reasons) == [3, 4, 5]
  clean = np.asarray(distances.pairwise_distances(params, "l2"))
  hit = np.asarray(distances.pairwise_distances(
      hostile.neutralize(tampered, sorted(reasons)), "l2"))
  keep = [0, 1, 2, 6, 7]
  np.testing.assert_allclose(hit[np.ix_(keep, keep)], clean[np.ix_(keep, keep)],
                             rtol=1e-6)
  assert np.all(np.isinf(hit[3, keep])) and np.all(np.diag(hit) == 0)


def test_hostile_spec_errors():
  with pytest.raises(ConfigError, match="hostile"):
    hostile.parse_hostile("3:melt", 5)
  with pytest.raises(ConfigError, match="hostile"):
    hostile.parse_hostile("9:nan", 5)
  with pytest.raises(ConfigError, match="hostile"):
    hostile.parse_hostile("nan", 5)


_FIELDS = {
    "providers": st.one_of(st.integers(-3, 8), st.just(2.5), st.just("x")),
    "malicious": st.integers(-2, 9),
    "steps": st.integers(-5, 60),
    "subrun_steps": st.integers(-1, 30),
    "replicated": st.integers(-1, 4),
    "alpha": st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                       st.sampled_from([0.0, 1.0, 0.05])),
    "poison_rate": st.one_of(st.floats(-1, 2), st.just(float("nan"))),
    "metric": st.sampled_from(list(protocol.METRICS) + ["euclid", ""]),
    "detector": st.sampled_from(["ks", "zscore", "krum", "nope"]),
    "attack": st.sampled_from(["badnets", "blend", "label_flip", "scaling",
                               "warp", "trojan"]),
    "learning_rate": st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                               st.just(0.05)),
    "trigger_size": st.integers(-1, 12),
    "trigger_location": st.sampled_from(["random", "center", "middle"]),
    "batch_size": st.integers(-1, 5000),
    "seed": st.one_of(st.integers(-5, 2**33), st.just(None)),
    "model": st.sampled_from(["mlp", "cnn", "transformer"]),
    "target_label": st.integers(-3, 12),
    "grad_noise": st.floats(-0.5, 1.5),
    "bf16_fraction": st.floats(-0.5, 1.5),
    "krum_f": st.integers(-3, 9),
    "ks_margin": st.floats(-1, 100),
    "hostile": st.sampled_from(["", "0:nan", "99:nan", "1:melt", "x"]),
}


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional=_FIELDS))
def test_fuzz_config_validation_is_clean(fields):
  try:
    protocol.validate(SimConfig.from_flat(**fields))
  except ConfigError as e:
    field = str(e).split(":")[0]
    assert field in KNOWN_FLAGS or field in (
        "divergence.grad_noise", "divergence.bf16_fraction"), str(e)


_DIGITS = None


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({
    "providers": st.integers(2, 5), "malicious": st.integers(0, 5),
    "steps": st.sampled_from([20, 40]), "subrun_steps": st.just(20),
    "replicated": st.integers(1, 2), "trigger_size": st.integers(1, 10),
    "target_label": st.integers(-1, 11), "batch_size": st.sampled_from([8, 32,
                                                                        2000]),
    "attack": st.sampled_from(["badnets", "blend", "label_flip", "warp",
                               "scaling"]),
    "metric": st.sampled_from(["l2", "cosine", "linf"]),
    "detector": st.sampled_from(["ks", "zscore", "krum", "multikrum",
                                 "median"]),
}))
def test_fuzz_valid_configs_run_or_fail_cleanly(fields):
  global _DIGITS
  _DIGITS = _DIGITS or data_lib.load_dataset("digits")
  cfg = SimConfig.from_flat(attack_check=False, **fields)
  try:
    protocol.validate(cfg)
    r = protocol.run(cfg, progress=False, dataset=_DIGITS)
  except ConfigError as e:
    assert str(e).split(":")[0] in KNOWN_FLAGS \
        or "." in str(e).split(":")[0], str(e)
    return
  assert len(r.providers()) == cfg.providers
  json.dumps(report.results_dict(r), allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([
    "--providers=1", "--providers=-4", "--providers=x", "--malicious=99",
    "--steps=0", "--steps=33", "--alpha=2", "--alpha=nan", "--metric=foo",
    "--attack=bar", "--model=baz", "--learning_rate=inf", "--seed=-1",
    "--subrun_steps=0", "--replicated=0", "--trigger_size=0",
    "--poison_rate=-0.1", "--hostile=1:melt", "--bogus_flag=1",
    "--trigger_location=nowhere", "--batch_size=0"]), min_size=1, max_size=3))
def test_fuzz_cli_bad_flags_exit_2_with_one_line(argv):
  from jaxrep import simulate
  errors = []

  def capture(message):
    errors.append(message)
    raise SystemExit(2)

  old = simulate._fail
  simulate._fail = capture
  try:
    simulate.FLAGS.unparse_flags()
    with pytest.raises(SystemExit) as exc:
      simulate._parse(["simulate", *argv, "--out=/nonexistent/never"])
      simulate.main(["simulate"])
    assert exc.value.code == 2
    assert len(errors) == 1 and "\n" not in errors[0]
  finally:
    simulate._fail = old
    simulate.FLAGS.unparse_flags()


def test_out_that_is_a_file_exits_2_before_training(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("not a directory")
  p = _simulate([f"--out={path}", "--steps=40", "--replicated=1"])
  _, err = p.communicate(timeout=120)
  assert p.returncode == 2
  assert err.strip().splitlines() == [
      f"error: --out: {path} exists and is not a directory"]
  assert path.read_text() == "not a directory"


def test_second_run_on_a_held_workdir_exits_2(tmp_path):
  from jaxrep.runtime import workdir
  busy = tmp_path / "busy"
  held = workdir.Claim(str(busy))
  try:
    p = _simulate([f"--out={busy}", "--steps=40", "--replicated=1"])
    _, err = p.communicate(timeout=120)
  finally:
    held.release()
  assert p.returncode == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "is in use by a live run" in lines[0], lines
  assert not (busy / "results.json").exists()
