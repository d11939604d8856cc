"""The accelerator-shaped path, checked on lowerings for GPUs and TPUs and on XLA:TPU's own
compile of the real train step (tests/xla_tpu.py: libtpu in a child process, no TPU needed).

- loops: the lookup's pick chunks are chosen per platform (`chunks.per_platform`): a CPU-cache
  chunk on CPUs (positive control: 128 loop steps here), few large steps on GPUs and TPUs;
- the compiled TPU step holds no conditional (mlm_loss has no lax.cond on the batch: on GPUs a
  device-to-host round trip per step) and no CPU custom call (the CPU kernels never reach another
  platform's program), and its sub-key scores run at float32 precision.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pkm_jax import cpu_kernels, product_keys, trainer
from pkm_jax.steps import MLM_BATCH_KEYS
from test_trainer import tiny_config
from xla_tpu import requires_libtpu, run_json

TRIP = re.compile(r"dense<(\d+)> : tensor<i32>")


def _lowered(fn, args, platform: str) -> str:
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def test_lookup_loop_steps_per_platform():
  """2,048 tokens x 128 picks x V 768 (6.3 MB of rows a pick): one pick a step on CPUs (the
  cache-sized chunk), 4 steps on GPUs and TPUs (chunks.ACCELERATOR_CHUNK_BYTES)."""
  m, v, n = 2048, 768, 4096
  args = (jax.ShapeDtypeStruct((n, v), jnp.float32), jax.ShapeDtypeStruct((m, 4, 32), jnp.int32),
          jax.ShapeDtypeStruct((m, 4, 32), jnp.float32))

  def fwd_bwd(values, idx, w):
    return jax.value_and_grad(lambda v, w: jnp.sum(product_keys.weighted_lookup(v, idx, w) ** 2),
                              (0, 1))(values, w)

  steps = {p: max(int(x) for x in TRIP.findall(_lowered(fwd_bwd, args, p)) if int(x) < n)
           for p in ("cpu", "cuda", "tpu")}
  assert steps == {"cpu": 128, "cuda": 4, "tpu": 4}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_train_step_lowers_without_cpu_custom_calls(platform):
  """The trainer's own jitted step (BERT + ResM, table columns over 'model', 2x4 host devices)
  lowered for an accelerator holds none of the CPU kernels' custom calls, which the CPU lowering
  of the same step does hold (positive control, where the kernels are built)."""
  config = tiny_config(**{"mesh.data": 2, "mesh.model": 4, "model.num_layers": 1,
                          "memory.layers": (0,), "memory.n_keys": 16})
  program = trainer.build_train_program(config, 64)
  b, t = config.data.batch_size, config.data.max_len
  batch = {k: jax.ShapeDtypeStruct((b, t), jnp.float32 if k == "mlm_weights" else jnp.int32)
           for k in MLM_BATCH_KEYS}

  def lowered(p):
    with jax.set_mesh(program.mesh):
      return program.train_step.trace(program.abstract_state, batch).lower(
          lowering_platforms=(p,)).as_text()

  targets = lambda text: set(re.findall(r"custom_call @(pkm_jax\w+)", text))  # noqa: E731
  assert not targets(lowered(platform))
  if cpu_kernels.available():
    assert targets(lowered("cpu"))


TPU_STEP = """
import json, re
import jax, jax.numpy as jnp
from jax.experimental import topologies
import sys; sys.path.insert(0, "tests")
from test_trainer import tiny_config
from pkm_jax import trainer
from pkm_jax.steps import MLM_BATCH_KEYS
topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
config = tiny_config(**{"mesh.data": 2, "mesh.model": 2, "model.num_layers": 1,
                        "memory.layers": (0,), "memory.n_keys": 16})
program = trainer.build_train_program(config, 64, devices=topo.devices)
b, t = config.data.batch_size, config.data.max_len
batch = {k: jax.ShapeDtypeStruct((b, t), jnp.float32 if k == "mlm_weights" else jnp.int32)
         for k in MLM_BATCH_KEYS}
with jax.set_mesh(program.mesh):
  lowered = program.train_step.lower(program.abstract_state, batch)
  hlo = lowered.compile().as_text()
print(json.dumps({
    "conditionals": len(re.findall(r"\\bconditional\\(", hlo)),
    "cpu_calls": re.findall(r'custom_call_target="(pkm_jax[^"]*)"', hlo),
    "highest_dots": len(re.findall(r"precision=HIGHEST|HIGHEST", lowered.as_text())),
    "platform": topo.devices[0].platform}))
"""


@requires_libtpu
def test_train_step_compiles_for_tpu_without_conditionals():
  got = run_json(TPU_STEP)
  assert got["platform"] == "tpu"
  assert got["conditionals"] == 0 and got["cpu_calls"] == []
  assert got["highest_dots"] > 0  # the sub-key scores and the query projection


def test_candidate_picks_by_sort_equal_top_k():
  """The GPU / TPU pick of the candidates (a stable key-value sort) against the CPU one (top_k,
  slots gathered): the same scores, slots and score gradients, ties included."""
  rng = np.random.default_rng(0)
  k, n = 8, 50
  v1 = -np.sort(-rng.integers(0, 4, (3, 16, k)).astype(np.float32), axis=-1)  # many ties
  v2 = -np.sort(-rng.integers(0, 4, (3, 16, k)).astype(np.float32), axis=-1)
  i1, i2 = (jnp.asarray(rng.integers(0, n, (3, 16, k)), jnp.int32) for _ in range(2))
  cand = jnp.concatenate([v1[..., i:i + 1] + v2[..., :k // (i + 1)] for i in range(k)], -1)
  want = product_keys._pick_by_top_k(cand, i1, i2, k=k, n=n)
  got = product_keys._pick_by_sort(cand, i1, i2, k=k, n=n)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  cot = jnp.asarray(rng.normal(size=(3, 16, k)), jnp.float32)
  grad = lambda pick: jax.grad(lambda c: jnp.sum(pick(c, i1, i2, k=k, n=n)[0] * cot))(cand)  # noqa
  np.testing.assert_array_equal(grad(product_keys._pick_by_sort),
                                grad(product_keys._pick_by_top_k))
