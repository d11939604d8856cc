"""pkm_jax.chunks: chunk sizes within the byte budget, and chunking that loses and adds nothing."""

import jax.numpy as jnp
import numpy as np
import pytest

from pkm_jax import chunks


@pytest.mark.parametrize("picks, bytes_per_pick, budget, want", [
    (12, 96, 500, 5),  # floor(500 / 96)
    (12, 96, 10_000, 12),  # never more than the picks
    (12, 96, 50, 1),  # never fewer than one
    (7, 0, 50, 7),
])
def test_pick_chunk_respects_the_budget(monkeypatch, picks, bytes_per_pick, budget, want):
  monkeypatch.setattr(chunks, "GATHER_CHUNK_BYTES", budget)
  assert chunks.pick_chunk(picks, bytes_per_pick) == want


@pytest.mark.parametrize("chunk", [1, 3, 5, 7, 12])
def test_to_chunks_pads_the_last_chunk_and_round_trips(chunk):
  x = np.arange(2 * 3 * 7).reshape(2, 3, 7)
  c = np.asarray(chunks.to_chunks(jnp.asarray(x), chunk, -1))
  assert c.shape == (-(-7 // chunk), 2, 3, chunk)
  # Chunk i holds picks i*chunk ... of every row, in order; the rest is padding.
  flat = np.moveaxis(c, 0, -2).reshape(2, 3, -1)
  np.testing.assert_array_equal(flat[..., :7], x)
  assert np.all(flat[..., 7:] == -1)
  np.testing.assert_array_equal(chunks.from_chunks(jnp.asarray(c), 7), x)
