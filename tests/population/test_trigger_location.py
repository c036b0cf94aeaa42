"""Own-backdoor patch triggers ("random", the default) sit on the image
border, where a patch does not cover the object; "anywhere" keeps the old
draw over the whole image (measured: a 2x2 patch in the middle of an 8x8
digit cost one attacker 2.2 points of clean accuracy, BUILD_NOTES 'Attacks
at CLI defaults')."""

import numpy as np

from jaxrep.population.families import image


def _corners(location, draws=400, size=2, h=8, w=8):
  rng = np.random.default_rng(0)
  out = set()
  for _ in range(draws):
    m = image._patch_mask(size, location, h, w, rng)[..., 0]
    rows, cols = np.nonzero(m)
    assert m.sum() == size * size
    out.add((rows.min(), cols.min()))
  return out


def test_random_location_touches_the_border_and_varies():
  seen = _corners("random")
  assert all(r in (0, 6) or c in (0, 6) for r, c in seen), seen
  assert len(seen) == len(image._border_positions(2, 8, 8)) == 24


def test_anywhere_reaches_the_interior():
  seen = _corners("anywhere")
  assert any(0 < r < 6 and 0 < c < 6 for r, c in seen)


def test_random_patterns_light_at_least_half_of_the_patch():
  rng = np.random.default_rng(1)
  for _ in range(200):
    mask = image._patch_mask(2, "random", 8, 8, rng)
    pattern = image._patch_pattern("random", 8, 8, 1, rng, mask)
    assert pattern[mask[..., 0] > 0].mean() >= 0.5
