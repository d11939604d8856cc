"""Counter-based randomness: random numbers and permutations as pure functions of integer keys.

A data loader whose batches must not depend on how it is split (hosts, worker processes,
threads) or on where it was resumed cannot draw from a stateful generator: the n-th draw would
depend on who drew before. Here every random number is a hash of (seed, stream, key, column)
instead, so row `p` of the training stream is shuffled and masked identically whoever computes
it, in any order. The hash is SplitMix64's finaliser (Steele et al. 2014), which passes BigCrush
as a counter-based generator; it runs vectorised in numpy's wrapping uint64 arithmetic.

- `uniform(seed, stream, keys_B, width)`: [B, width] floats in [0, 1), one row per key.
- `permute(indices, n, seed, epoch)`: a bijection of [0, n) (a Feistel network with cycle
  walking), evaluated only at the indices asked for: a global shuffle of n rows in O(batch)
  memory, a different one per epoch.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_FEISTEL_ROUNDS = 6  # 4 already make a pseudo-random permutation (Luby-Rackoff); 2 for margin
_PERMUTE_STREAM = 0x9E3779B9  # the stream of permute's keys; uniform's callers use small ones


def mix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser on a uint64 array: a bijection that scrambles every bit."""
  z = np.asarray(x, np.uint64) + _GOLDEN
  z = (z ^ (z >> np.uint64(30))) * _M1
  z = (z ^ (z >> np.uint64(27))) * _M2
  return z ^ (z >> np.uint64(31))


def _key(seed: int, stream: int) -> np.uint64:
  """One uint64 per (seed, stream); both must be non-negative and below 2**32."""
  if not (0 <= seed < 2**32 and 0 <= stream < 2**32):
    raise ValueError(f"seed={seed} and stream={stream} must be in [0, 2**32)")
  return mix64(np.array([(seed << 32) | stream], np.uint64))[0]


def uniform(seed: int, stream: int, keys_B: np.ndarray, width: int) -> np.ndarray:
  """[B, width] float64 uniforms in [0, 1): row b depends only on (seed, stream, keys_B[b])."""
  row_B1 = mix64(np.asarray(keys_B, np.uint64).reshape(-1, 1) ^ _key(seed, stream))
  bits_BxW = mix64(row_B1 + np.arange(width, dtype=np.uint64)[None, :] * _GOLDEN)
  return (bits_BxW >> np.uint64(11)).astype(np.float64) * 2.0**-53  # top 53 bits: exact floats


def permute(indices: np.ndarray, n: int, seed: int, epoch: int = 0) -> np.ndarray:
  """Images of `indices` (in [0, n)) under a pseudo-random permutation of [0, n) from (seed,
  epoch).

  A balanced Feistel network permutes [0, 4**h) for the smallest 4**h >= n; an image that
  falls outside [0, n) is permuted again ("cycle walking") until it lands inside, which keeps
  the map a bijection of [0, n). At most 4x oversized, so the expected number of walks is < 4.
  """
  idx = np.asarray(indices, np.int64)
  if n < 1 or (idx.size and (idx.min() < 0 or idx.max() >= n)):
    raise ValueError(f"indices must lie in [0, n={n})")
  half = max(1, (int(n - 1).bit_length() + 1) // 2)
  mask = np.uint64((1 << half) - 1)
  base = _key(seed, _PERMUTE_STREAM)
  rounds = np.uint64(epoch) * np.uint64(_FEISTEL_ROUNDS) + np.arange(_FEISTEL_ROUNDS,
                                                                     dtype=np.uint64)
  round_keys = list(mix64(rounds ^ base))

  def feistel(x: np.ndarray) -> np.ndarray:
    left, right = x >> np.uint64(half), x & mask
    for k in round_keys:
      left, right = right, left ^ (mix64(right ^ k) & mask)
    return (left << np.uint64(half)) | right

  out = idx.astype(np.uint64)
  todo = np.arange(out.size)
  while todo.size:
    out[todo] = feistel(out[todo])
    todo = todo[out[todo] >= np.uint64(n)]
  return out.astype(np.int64)
