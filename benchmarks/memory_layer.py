"""Per-component cost of one product-key memory layer, next to a BERT FFN on the same tokens.

Each row is one jitted function of precomputed inputs, timed as the median of --steps calls after
--warmup untimed ones (compilation), each ended with jax.block_until_ready; nothing here is
specific to a backend, so the same command runs on CPU, GPU and TPU. Rows:
  query projection      Linear D -> H*Kd, then batchnorm over the tokens (float32, as the layer)
  sub-key scores        both halves' [H, T, n] scores (two batched matmuls)
  first-stage top-k     top-k over each half's n scores: pkm_jax.cpu_top_k.top_k (its custom call
                        on CPU); "jax.lax.top_k" the same through XLA's TopK, for comparison
  candidate stage       top-k over the pairs (i+1)(j+1) <= k of the two sorted lists (what the
                        search runs); "full grid" is the same over all k x k pairs, for comparison
  search                product_key_topk end to end (projection excluded)
  lookup forward        weighted_lookup: the weighted sum of the H*k picked value rows, as the
                        layer runs it (on one CPU: pkm_jax.cpu_lookup's custom calls;
                        --lookup_kernel pallas: the Pallas kernel of this platform); "pure JAX"
                        the same through product_keys (what GPUs and TPUs run), for comparison
  lookup backward       its VJP: d values (a dense [N, V] table) and d weights; "pure JAX" too
  value update dense    Adam on the whole [N, V] table from its dense gradient (params donated)
  value update sparse   row gradients of the picked rows + row-sparse Adam stepping them in place
                        (their custom calls on CPU: pkm_jax.cpu_sparse_rows); "pure JAX" the same
                        through XLA (what GPUs and TPUs run), for comparison
  memory layer forward  ProductKeyMemory in eval mode: all of the above forward
  FFN forward / fwd+bwd BERT's D -> 4D (exact GELU) -> D on the same tokens
The JSON (--out) holds the settings, the device and every row in milliseconds.

  python benchmarks/memory_layer.py                       # BERT-base, the paper's memory
  python benchmarks/memory_layer.py --dtype bfloat16      # bf16 table, lookup and FFN
  python benchmarks/memory_layer.py --tiny                # seconds: a smoke run
  python benchmarks/memory_layer.py --lookup_kernel pallas  # on a GPU or TPU
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a plain script
from pkm_jax import product_keys, sparse_adam  # noqa: E402
from pkm_jax import config_checks  # noqa: E402
from pkm_jax import host_memory  # noqa: E402
from pkm_jax.architecture import MemoryConfig  # noqa: E402
from pkm_jax.cpu_top_k import top_k  # noqa: E402
from pkm_jax.memory import ProductKeyMemory  # noqa: E402
from pkm_jax.placement import MemoryPlacement  # noqa: E402

TINY = dict(hidden=32, n_keys=16, heads=2, k=4, k_dim=8, tokens=64, steps=2, warmup=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--hidden", type=int, default=768, help="model width D = value width V")
  p.add_argument("--n_keys", type=int, default=512)
  p.add_argument("--heads", type=int, default=4, help="memory heads H")
  p.add_argument("--k", type=int, default=32)
  p.add_argument("--k_dim", type=int, default=256)
  p.add_argument("--tokens", type=int, default=1024, help="tokens T per call (8 x 128)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="value table, lookup and FFN dtype; the query path stays float32")
  p.add_argument("--lookup_kernel", choices=config_checks.LOOKUP_KERNELS, default="xla",
                 help="lookup rows and layer: pure JAX, or pkm_jax/lookup_kernels.py "
                      "(interpret mode on CPU: slow, a correctness run only)")
  p.add_argument("--steps", type=int, default=5, help="timed calls per row")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls first (compilation)")
  p.add_argument("--tiny", action="store_true", help=f"small sizes, for a smoke run: {TINY}")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" /
                                      "memory_layer.json"))
  args = p.parse_args(argv)
  if args.tiny:
    for key, value in TINY.items():
      setattr(args, key, value)
  if args.k > args.n_keys or args.k_dim % 2 or min(args.k, args.tokens, args.steps) < 1:
    p.error("need 1 <= k <= n_keys, an even k_dim, tokens >= 1 and steps >= 1")
  return args


def median_ms(fn: Callable[..., Any], args: tuple, warmup: int, steps: int,
              carry: int = 0) -> float:
  """Median wall time of fn(*args) in ms. With carry > 0, fn returns new values for its first
  `carry` arguments (donated: the table updated in place), which the next call receives."""
  times = []
  for step in range(warmup + steps):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    if step >= warmup:
      times.append(time.perf_counter() - start)
    if carry:
      args = tuple(out) + args[carry:]
  return statistics.median(times) * 1e3


def full_grid_candidates(v1, i1, v2, i2, n):
  """The candidate stage before the pruning: one top_k over all k x k pairs (for comparison)."""
  k = v1.shape[-1]
  scores, pos = top_k((v1[..., :, None] + v2[..., None, :]).reshape(*v1.shape[:-1], -1), k)
  slots = (i1[..., :, None] * n + i2[..., None, :]).reshape(*i1.shape[:-1], -1)
  return scores, jnp.take_along_axis(slots, pos, axis=-1)


def run(args: argparse.Namespace) -> list[dict]:
  dtype = jnp.dtype(args.dtype)
  t, d, h, kd, n, k = args.tokens, args.hidden, args.heads, args.k_dim, args.n_keys, args.k
  cfg = MemoryConfig(n_keys=n, heads=h, k=k, k_dim=kd, v_dim=d)
  placement = MemoryPlacement(lookup_kernel=args.lookup_kernel)
  mem = ProductKeyMemory(d, cfg, placement=placement, rngs=nnx.Rngs(args.seed))
  r = np.random.default_rng(args.seed)
  x_TxD = jnp.asarray(r.normal(size=(t, d)), jnp.float32)
  keys = mem.keys[...]
  values_NxV = mem.values[...].astype(dtype)
  w_in, b_in = mem.query_proj.kernel[...], mem.query_proj.bias[...]
  norm = mem.query_norm

  def project(x_TxD):
    q = x_TxD @ w_in + b_in
    mean, var = q.mean(0), q.var(0)  # batchnorm in training mode: batch statistics
    return (q - mean) * jax.lax.rsqrt(var + norm.epsilon) * norm.scale[...] + norm.bias[...]

  q_TxHxK = jax.jit(project)(x_TxD).reshape(t, h, kd)
  q_HxTxK = q_TxHxK.transpose(1, 0, 2)
  half = kd // 2

  def subkey_scores(q_HxTxK, keys):
    return (jnp.einsum("htd,hnd->htn", q_HxTxK[..., :half], keys[:, 0]),
            jnp.einsum("htd,hnd->htn", q_HxTxK[..., half:], keys[:, 1]))

  s1, s2 = jax.jit(subkey_scores)(q_HxTxK, keys)
  first_stage = lambda s1, s2: (top_k(s1, k), top_k(s2, k))
  (v1, i1), (v2, i2) = jax.jit(first_stage)(s1, s2)
  scores, idx_TxHxk = product_keys.product_key_topk(q_TxHxK, keys, k)
  w_TxHxk = jax.nn.softmax(scores, axis=-1).astype(dtype)
  lookup = placement.lookup
  g_TxV = jnp.asarray(r.normal(size=(t, d)), jnp.float32)  # the lookup sums in float32

  def lookup_backward(values, idx, w, g, lookup=lookup):
    return jax.vjp(lambda v, w: lookup(v, idx, w), values, w)[1](g)

  g_values = jax.jit(lookup_backward)(values_NxV, idx_TxHxk, w_TxHxk, g_TxV)[0]
  adam = optax.adam(1e-3)

  def dense_update(values, opt_state, g_values):
    updates, opt_state = adam.update(g_values, opt_state, values)
    return optax.apply_updates(values, updates), opt_state

  def sparse_update(values, opt_state, idx, w, g, kernels=True):
    ids, rows = sparse_adam.row_gradients(idx[None], w[None], g[None], num_rows=values.shape[0],
                                          use_cpu_kernel=kernels)
    row_adam = sparse_adam.sparse_adam(1e-3, use_cpu_kernel=kernels)
    return row_adam.step(ids, rows, opt_state, values)  # what the train step runs

  row_adam_state = lambda: sparse_adam.sparse_adam(1e-3).init(values_NxV)  # noqa: E731

  mem.values[...] = values_NxV
  graphdef, state = nnx.split(mem)
  layer = lambda state, x: nnx.merge(graphdef, state)(x[None], jnp.ones((1, t)))[0]
  ffn_w1 = jnp.asarray(r.normal(size=(d, 4 * d)) / np.sqrt(d), dtype)
  ffn_w2 = jnp.asarray(r.normal(size=(4 * d, d)) / np.sqrt(4 * d), dtype)
  ffn = lambda x, w1, w2: jax.nn.gelu(x.astype(dtype) @ w1, approximate=False) @ w2
  ffn_grad = jax.grad(lambda x, w1, w2: jnp.sum(ffn(x, w1, w2).astype(jnp.float32) ** 2),
                      argnums=(0, 1, 2))

  rows: list[tuple[str, Callable, tuple, int]] = [
      ("query projection", project, (x_TxD,), 0),
      ("sub-key scores", subkey_scores, (q_HxTxK, keys), 0),
      ("first-stage top-k", first_stage, (s1, s2), 0),
      ("first-stage top-k, jax.lax.top_k",
       lambda s1, s2: (jax.lax.top_k(s1, k), jax.lax.top_k(s2, k)), (s1, s2), 0),
      ("candidate stage", lambda *a: product_keys.candidate_topk(*a, n), (v1, i1, v2, i2), 0),
      ("candidate stage, full k x k grid", lambda *a: full_grid_candidates(*a, n),
       (v1, i1, v2, i2), 0),
      ("search", lambda q, keys: product_keys.product_key_topk(q, keys, k), (q_TxHxK, keys),
       0),
      ("lookup forward", lookup, (values_NxV, idx_TxHxk, w_TxHxk), 0),
      ("lookup backward", lookup_backward, (values_NxV, idx_TxHxk, w_TxHxk, g_TxV), 0),
      ("lookup forward, pure JAX", product_keys.weighted_lookup,
       (values_NxV, idx_TxHxk, w_TxHxk), 0),
      ("lookup backward, pure JAX",
       functools.partial(lookup_backward, lookup=product_keys.weighted_lookup),
       (values_NxV, idx_TxHxk, w_TxHxk, g_TxV), 0),
      ("value update dense", jax.jit(dense_update, donate_argnums=(0, 1)),
       (values_NxV.copy(), adam.init(values_NxV), g_values), 2),
      ("value update sparse", jax.jit(sparse_update, donate_argnums=(0, 1)),
       (values_NxV.copy(), row_adam_state(), idx_TxHxk, w_TxHxk, g_TxV), 2),
      ("value update sparse, pure JAX",
       jax.jit(functools.partial(sparse_update, kernels=False), donate_argnums=(0, 1)),
       (values_NxV.copy(), row_adam_state(), idx_TxHxk, w_TxHxk, g_TxV), 2),
      ("memory layer forward", layer, (state, x_TxD), 0),
      ("FFN forward", ffn, (x_TxD, ffn_w1, ffn_w2), 0),
      ("FFN forward+backward", ffn_grad, (x_TxD, ffn_w1, ffn_w2), 0),
  ]
  del g_values
  results = []
  for name, fn, fn_args, carry in rows:
    ms = median_ms(fn if carry else jax.jit(fn), fn_args, args.warmup, args.steps, carry)
    results.append(dict(component=name, ms=ms))
    print(f"{name}: {ms:.2f} ms", flush=True)
  ffn_ms = next(r["ms"] for r in results if r["component"] == "FFN forward")
  for r in results:
    r["x_ffn_forward"] = r["ms"] / ffn_ms
  return results


def markdown_table(results: list[dict]) -> str:
  rows = ["| component | ms | x FFN forward |", "|---|---:|---:|"]
  rows += [f"| {r['component']} | {r['ms']:.2f} | {r['x_ffn_forward']:.2f} |" for r in results]
  return "\n".join(rows)


def main(argv: list[str] | None = None) -> list[dict]:
  args = parse_args(argv)
  results = run(args)
  device = jax.devices()[0].device_kind
  print(f"\n{device}, {args.tokens} tokens, hidden {args.hidden}, n_keys {args.n_keys} "
        f"({args.n_keys ** 2} slots), heads {args.heads}, k {args.k}, k_dim {args.k_dim}, "
        f"{args.dtype}, lookup {args.lookup_kernel}\n\n{markdown_table(results)}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(settings=vars(args), device=device,
                                 platform=jax.devices()[0].platform,
                                 jax_version=jax.__version__, results=results), indent=2) + "\n")
  print(f"\nwrote {out}")
  return results


if __name__ == "__main__":
  host_memory.reexec_with_huge_pages()  # as train.py does (pkm_jax/cli.py)
  main()
