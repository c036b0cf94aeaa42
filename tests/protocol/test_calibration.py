"""Adaptive attackers in the protocol: calibration against benign
divergence, and populations of adaptive attackers on both modalities."""

import numpy as np
import pytest

from jaxrep import data
from jaxrep import protocol
from jaxrep.config import SimConfig
from jaxrep.population import adaptive
from jaxrep.population.families.image import IMAGE
from jaxrep.population.families.text import TEXT
from jaxrep.protocol import calibration


def test_protocol_run_with_adaptive_providers(digits):
  """Constrained at c = 1 evades KS; a plain backdoor beside it does not."""
  cfg = SimConfig.from_flat(providers=6, malicious=2, steps=40,
                            subrun_steps=20, replicated=2, attack_check=False,
                            probe_size=32)
  cal = calibration.calibrate(cfg, digits)
  assert 0 < cal.ratio < 1e-4
  b = adaptive.wrap(IMAGE.make_behaviour(
      # The attackers first (placement is not what this test is about).
      sorted(IMAGE.population_specs(6, 2, "badnets", num_classes=10),
             key=lambda s: s is None),
      digits.input_shape, 10))
  b = adaptive.adapt(b, [0], "constrained", 1.0, ratio=cal.ratio)
  r = protocol.run(cfg, progress=False, dataset=digits, behaviour=b,
                   hooks=adaptive.make_hooks(b))
  assert r.attack_names[:3] == ["constrained", "badnets", None]
  assert r.flags[1] and not r.flags[0] and not r.flags[2:].any()
  # Its distances look benign: within 10x of the benign-benign ones.
  d = r.matrices[0]
  benign = d[2:, 2:][np.triu_indices(4, 1)]
  assert np.median(d[0, 2:]) < 10 * np.median(benign)


@pytest.fixture(scope="module")
def texts():
  return data.load_dataset("text_synthetic")


@pytest.mark.parametrize("attack, strength, count, names", [
    ("low_rate", 1 / 32, 2, ["low_rate"] * 2),
    ("sporadic", 0.5, 2, ["sporadic"] * 2),
    ("constrained", 3.0, 2, ["constrained"] * 2),
    ("mimicry", 0.1, 2, ["mimicry"] * 2),
    ("collusion", 0.5, 3, ["collusion"] * 3),
])
@pytest.mark.parametrize("modality", ["image", "text"])
def test_populations_of_adaptive_attackers(digits, texts, modality, attack,
                                           strength, count, names):
  ds = digits if modality == "image" else texts
  cfg = SimConfig.from_flat(providers=6, malicious=2, steps=40,
                            subrun_steps=20, replicated=2)
  setup = calibration.population(
      cfg, ds, attack, strength,
      calibration=calibration.Calibration(1.0, 1.0, 1e-3))
  b = setup.behaviour
  assert setup.malicious == count
  mal = b.malicious
  assert mal.sum() == count
  assert [b.names()[i] for i in np.flatnonzero(mal)] == names
  assert all(b.names()[i] is None for i in np.flatnonzero(~mal))
  assert b.base.family is (IMAGE if modality == "image" else TEXT)
  assert setup.hooks.twin_size == (count if attack in ("constrained",
                                                       "mimicry") else 0)
  assert (setup.behaviour_for_subrun is None) == (attack != "sporadic")
  rates = np.asarray(b.base.poison_rate)[mal]
  np.testing.assert_allclose(rates, strength if attack == "low_rate" else 0.1)


@pytest.mark.parametrize("name,strength,expect", [
    ("sporadic", -1, 0.25), ("low_rate", 0.05, 0.05), ("collusion", -1, None)])
def test_adaptive_attackers_from_the_config(digits, name, strength, expect):
  config = SimConfig.from_flat(providers=8, malicious=2, steps=40,
                               subrun_steps=10, replicated=1, adaptive=name,
                               adaptive_strength=strength)
  adv = calibration.from_config(protocol.validate(config), digits)
  b = adv.behaviour
  mal = np.asarray(b.malicious)
  assert mal.sum() == 2 and adv.malicious == 2
  assert set(np.asarray(b.tag)[mal]) == {adaptive.TAG[name]}
  assert set(np.asarray(b.tag)[~mal]) == {0}
  assert (adv.behaviour_for_subrun is not None) == (name == "sporadic")
  if name == "sporadic":
    assert set(np.asarray(b.share)[mal]) == {np.float32(expect)}
  if name == "low_rate":
    assert np.allclose(np.asarray(b.base.poison_rate)[mal], expect)
  assert calibration.from_config(config.replace(adaptive="none"),
                                 digits) is None


@pytest.mark.parametrize("flags,message", [
    (dict(adaptive="stealth"), "adaptive: unknown adaptive attack 'stealth'"),
    (dict(adaptive="collusion", adaptive_strength=0.5),
     "adaptive_strength: collusion has no strength"),
    (dict(adaptive="sporadic", adaptive_strength=0.0),
     "adaptive_strength: must be -1"),
])
def test_bad_adaptive_settings(flags, message):
  from jaxrep.core.errors import ConfigError
  with pytest.raises(ConfigError, match=message):
    protocol.validate(SimConfig.from_flat(**flags))
