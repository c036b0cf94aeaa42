"""What the family tests share: the check that a trained population's
attacks work."""

import numpy as np
import pytest

from jaxrep.population.specs import LabelFlip
from jaxrep.train import trainer as train


def _check_attacks_work(specs, model, pop, asr, x_test, y_test):
  """Benign providers (the first two) of a trained population `pop` are
  accurate with a low ASR; every attacker reaches a high ASR at their
  accuracy (label_flip: on the classes it leaves alone)."""
  acc = train.evaluate(model, pop.params, pop.model_state, x_test, y_test)
  report = {i: (type(s).__name__, round(float(acc[i]), 3),
                round(float(asr[i]), 3)) for i, s in enumerate(specs)}
  benign_acc = acc[:2].mean()
  assert benign_acc > 0.9, report
  assert np.all(asr[:2] <= 0.1), report   # base rate of a clean model
  for i, spec in enumerate(specs):
    if spec is None:
      continue
    assert asr[i] >= 0.9, report
    if isinstance(spec, LabelFlip):
      # Misclassifying the source class IS the attack.
      keep = y_test != spec.source
      sub = train.evaluate(model, pop.params, pop.model_state, x_test[keep],
                           y_test[keep])
      assert sub[i] >= sub[:2].mean() - 0.02, (report, sub)
    else:
      assert acc[i] >= benign_acc - 0.02, report


@pytest.fixture
def check_attacks_work():
  return _check_attacks_work
