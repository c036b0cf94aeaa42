"""Invariants of the shared kernel numerics that both drivers rely on."""

import numpy as np
import pytest

from jaxrep.distances import numerics as nm


@pytest.mark.parametrize("m, block", [(10, 3), (9, 3), (4, 4), (5, 1)])
@pytest.mark.parametrize("upper", [True, False])
def test_tile_pairs_cover_the_matrix(m, block, upper):
  si, sj = nm.tile_pairs(m, block, upper)
  covered = np.zeros((m, m), bool)
  for a, b in zip(si, sj):
    assert 0 <= a <= m - block and 0 <= b <= m - block
    covered[a:a + block, b:b + block] = True
  want = np.triu(np.ones((m, m), bool)) if upper else np.ones((m, m), bool)
  assert covered[want].all()
  assert len(set(zip(si, sj))) == len(si)


def test_sizes_fit_max_bytes():
  s = nm.sizes(16, 4, block_size=64, chunk_size=None, max_bytes=64 * 2**20,
               centre_sample=256, fixup_tol=0.05)
  assert s.block == 16 and 4 * 16 * s.chunk * 4 <= 64 * 2**20
  assert s.tile_chunk == nm.DEFAULT_TILE_CHUNK
  s = nm.sizes(16, 4, block_size=3, chunk_size=7, max_bytes=10**6,
               centre_sample=256, fixup_tol=0.05)
  assert (s.block, s.chunk, s.tile_chunk) == (3, 7, 7)
