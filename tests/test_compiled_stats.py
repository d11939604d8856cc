"""compiled_stats on tiny hand-made programs whose collectives, loops and sorts are known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from pkm_jax import compiled_stats


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))


def compile_shard_map(mesh, body, shape, in_spec, out_spec):
  f = jax.shard_map(body, mesh=mesh, in_specs=in_spec, out_specs=out_spec, check_vma=False)
  s = NamedSharding(mesh, in_spec)
  return jax.jit(f).lower(jax.ShapeDtypeStruct(shape, jnp.float32, sharding=s)).compile()


def test_collective_bytes_by_kind(mesh):
  # Each device holds [16, 32] float32 = 2048 bytes.
  def body(x):
    total = jax.lax.psum(x, "x")                                   # all-reduce: 2048 B
    gathered = jax.lax.all_gather(x, "x", tiled=True)              # all-gather: 8 x 2048 B
    scattered = jax.lax.psum_scatter(x, "x", tiled=True)           # reduce-scatter: 2048 B
    swapped = jax.lax.all_to_all(x, "x", 0, 0, tiled=True)         # all-to-all: 2048 B
    shifted = jax.lax.ppermute(x, "x", [(i, (i + 1) % 8) for i in range(8)])  # permute: 2048 B
    return (total + swapped + shifted, gathered, scattered)

  compiled = compile_shard_map(mesh, body, (128, 32), P("x"), (P("x"), P(), P("x")))
  stats = compiled_stats.program_stats(compiled)
  b = stats["collective_bytes"]
  # XLA may combine or decompose ops; what each kind moves per device is fixed by the program.
  assert b["all-gather"] == 8 * 2048
  for kind in ("all-reduce", "all-to-all", "collective-permute"):
    assert b[kind] == 2048, (kind, b)
  # CPU may lower reduce-scatter as an all-reduce + slice: the bytes go to one or the other.
  assert b["reduce-scatter"] + b["all-reduce"] == 2 * 2048, b
  assert stats["flops"] > 0 and stats["peak_bytes"] >= 2048


def test_loop_trip_counts_multiply_collectives(mesh):
  def body(x):
    def step(i, c):
      return c + jax.lax.psum(c * i, "x")
    return jax.lax.fori_loop(0, 7, step, x)

  compiled = compile_shard_map(mesh, body, (64, 16), P("x"), P("x"))
  stats = compiled_stats.program_stats(compiled)
  assert [loop["trip_count"] for loop in stats["loops"]] == [7]
  assert stats["loop_iterations"] == 7 and stats["unknown_trip_counts"] == 0
  # [8, 16] float32 per device, reduced once per iteration.
  assert stats["collective_bytes"]["all-reduce"] == 7 * 8 * 16 * 4
  assert stats["collective_count"]["all-reduce"] == 7


def test_sorts_and_conditionals():
  def f(x, flag):
    y = jnp.sort(x)
    return jax.lax.cond(flag, lambda: y * 2, lambda: y - 1)

  compiled = jax.jit(f).lower(jax.ShapeDtypeStruct((100,), jnp.float32),
                              jax.ShapeDtypeStruct((), jnp.bool_)).compile()
  stats = compiled_stats.program_stats(compiled)
  assert stats["sorts"] == 1 and stats["conditionals"] == 1
  assert not any(stats["collective_bytes"].values())


def test_trip_count_read_from_the_condition():
  # XLA:TPU writes no known_trip_count: the count comes from `i < 5` with i from constant 0.
  text = """HloModule m
%cond (p: (s32[], f32[4])) -> pred[] {
  %c = s32[] constant(5)
  %p = (s32[], f32[4]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}
%body (q: (s32[], f32[4])) -> (s32[], f32[4]) {
  %q = (s32[], f32[4]) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %v = f32[4] get-tuple-element(%q), index=1
  %r = f32[4] all-reduce(%v), to_apply=%add
  ROOT %t = (s32[], f32[4]) tuple(%j, %r)
}
ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4] parameter(0)
  %zero = s32[] constant(0)
  %z = s32[] copy(%zero)
  %init = (s32[], f32[4]) tuple(%z, %a)
  %w = (s32[], f32[4]) while(%init), condition=%cond, body=%body
  ROOT %out = f32[4] get-tuple-element(%w), index=1
}
"""
  stats = compiled_stats.hlo_stats(text)
  assert stats["loops"][0]["trip_count"] == 5
  assert stats["collective_bytes"]["all-reduce"] == 5 * 16


def test_async_chain_counts_once_and_branches_average():
  # XLA:TPU repeats one all-gather in its start / done fusions under one chain_id; a
  # conditional runs one branch: 8 B in one, 24 B in the other -> 16 B on average.
  text = """HloModule m
%start (a: f32[2]) -> f32[16] {
  %a = f32[2] parameter(0)
  ROOT %g = f32[16] all-gather(%a), dimensions={0}, frontend_attributes={chain_id="0"}
}
%done (b: f32[2]) -> f32[16] {
  %b = f32[2] parameter(0)
  ROOT %g2 = f32[16] all-gather(%b), dimensions={0}, frontend_attributes={chain_id="0"}
}
%small (c: f32[2]) -> f32[2] {
  %c = f32[2] parameter(0)
  ROOT %r = f32[2] all-reduce(%c), to_apply=%add
}
%big (d: f32[2]) -> f32[6] {
  %d = f32[2] parameter(0)
  %e = f32[6] broadcast(%d), dimensions={}
  ROOT %r2 = f32[6] all-reduce(%e), to_apply=%add
}
ENTRY %main (x: f32[2], p: pred[]) -> f32[16] {
  %x = f32[2] parameter(0)
  %p = pred[] parameter(1)
  %f1 = f32[16] fusion(%x), kind=kCustom, calls=%start
  %f2 = f32[16] fusion(%x), kind=kCustom, calls=%done
  %k = f32[2] conditional(%p, %x, %x), true_computation=%small, false_computation=%big
  ROOT %o = f32[16] add(%f1, %f2)
}
"""
  stats = compiled_stats.hlo_stats(text)
  assert stats["collective_bytes"]["all-gather"] == 64
  assert stats["collective_count"]["all-gather"] == 1
  assert stats["collective_bytes"]["all-reduce"] == (8 + 24) / 2
  assert stats["conditionals"] == 1


def test_combined_all_gathers_count_every_result():
  """XLA's all-gather combiner joins gathers (e.g. FSDP's weights) into one op with a tuple
  result; an async start's shape holds its operands first: (4+8) floats in, (32+64) out."""
  text = """HloModule m
ENTRY %main (a: f32[4], b: f32[8]) -> (f32[32], f32[64]) {
  %a = f32[4] parameter(0)
  %b = f32[8] parameter(1)
  %s = ((f32[4], f32[8]), (f32[32], f32[64])) all-gather-start(%a, %b), dimensions={0}
  %d = (f32[32], f32[64]) all-gather-done(%s)
  %g = (f32[32], f32[64]) all-gather(%a, %b), dimensions={0}
  ROOT %t = (f32[32], f32[64]) tuple(%d)
}
"""
  stats = compiled_stats.hlo_stats(text)
  assert stats["collective_bytes"]["all-gather"] == 2 * (32 + 64) * 4
  assert stats["collective_count"]["all-gather"] == 2


def test_shape_bytes():
  assert compiled_stats.shape_bytes("(f32[8,4]{1,0:T(8,128)}, s32[], bf16[3])") == 128 + 4 + 6
  assert compiled_stats.shape_bytes("pred[]") == 1
  np.testing.assert_equal(compiled_stats.shape_bytes("f32[0]"), 0)
