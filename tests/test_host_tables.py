"""Value tables in pinned host memory (`mesh.table_memory='pinned_host'`, pkm_jax.host_tables).

- On this CPU (host and device memory are one RAM, the same program runs): the lookups, every
  memory kind's model forward and eval.py's metrics equal those of device tables.
- Lowered for TPUs and GPUs: XLA:TPU's deviceless compile of the eval forward (tests/xla_tpu.py)
  and jax's CUDA lowering (compiled by XLA:GPU too where jax's CUDA plugin is in `.cuda/`) put
  the tables in host memory (`S(5)`), gather on the host thread (`HostExecute`), and bring the
  device only the picked rows: no device-memory array of a table's shape exists, and the device's
  arguments and temporaries are smaller than the table; with device tables (positive control)
  the table is a device argument.
"""

import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pkm_jax import checkpoint as ckpt_lib
from pkm_jax import chunks, evaluate, host_tables, memory_kinds, pretrained, product_keys
from pkm_jax import trainer
from pkm_jax.config import ConfigError
from pkm_jax.deviceless import ROOT, cuda_env
from pkm_jax.models.registry import build_lm
from pkm_jax.models.tables import row_tables, state_at
from test_trainer import tiny_config
from xla_tpu import requires_libtpu, run_json

from flax import nnx

HOST = jax.sharding.NamedSharding(jax.sharding.Mesh(jax.devices()[:1], ("one",)),
                                  jax.sharding.PartitionSpec(), memory_kind="pinned_host")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int8, jnp.float8_e4m3fn])
@pytest.mark.parametrize("chunk_bytes", [chunks.ACCELERATOR_CHUNK_BYTES, 3000])
def test_lookups_equal_the_device_ones(dtype, chunk_bytes, monkeypatch):
  """weighted_lookup and row_dots on a host table against product_keys / memory_kinds on the
  same table in device memory; 3000 bytes a fetch: several chunks, the last one short."""
  monkeypatch.setattr(chunks, "ACCELERATOR_CHUNK_BYTES", chunk_bytes)
  rng = np.random.default_rng(0)
  n, v = 300, 16
  table = jnp.asarray(rng.normal(size=(n, v)) * (50 if dtype == jnp.int8 else 1), dtype)
  idx = jnp.asarray(rng.integers(0, n, (2, 5, 3, 4)), jnp.int32)
  w = jnp.asarray(rng.normal(size=(2, 5, 3, 4)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(2, 5, v)), jnp.float32)
  on_host = jax.device_put(table, HOST)
  assert jax.typeof(on_host).memory_space == jax.memory.Space.Host
  got = jax.jit(host_tables.weighted_lookup)(on_host, idx, w)
  want = jax.jit(product_keys.weighted_lookup)(table, idx, w)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  got = jax.jit(host_tables.row_dots)(on_host, idx, x)
  want = jax.jit(memory_kinds.row_dots)(table, idx, x.astype(jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # The rows fetched are the table's: a wrong row would change the sums above, a wrong dtype
  # here.
  rows = jax.jit(host_tables.fetch_rows)(on_host, idx.reshape(10, 12))
  assert rows.dtype == dtype and jax.typeof(rows).memory_space == jax.memory.Space.Device
  np.testing.assert_array_equal(rows, np.asarray(table)[np.asarray(idx).reshape(10, 12)])


MODELS = {
    "pkm": {},
    "memory_plus": {"memory.kind": "memory_plus", "memory.gate": "silu"},
    "peer": {"memory.kind": "peer"},
    "peer_shared": {"memory.kind": "peer", "memory.share_values": True,
                    "memory.layers": (0, 1), "memory.value_dtype": "bfloat16"},
    "peer_int8": {"memory.kind": "peer", "memory.value_dtype": "int8"},  # quantised: scales
    "pkm_fp8": {"memory.value_dtype": "float8_e4m3fn"},  # stay on the device
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_forward_equals_device_tables(name):
  """pretrained.build_model with table_memory='pinned_host' (tables moved to the host, the
  layers' placement told) against the same weights on the device: equal logits."""
  from pkm_jax import config as config_lib
  config = tiny_config(**MODELS[name])
  cfg = config_lib.model_config(config, vocab_size=64)
  params = nnx.to_pure_dict(nnx.state(build_lm(cfg, rngs=nnx.Rngs(3)), nnx.Param))
  # Non-zero tables (ResM starts them at zero).
  rng = np.random.default_rng(1)
  for path, _, _ in row_tables(cfg).values():
    table = state_at(params, path)
    scale = 50 if table.dtype == jnp.int8 else 1
    state_at(params, path[:-1])[path[-1]] = jnp.asarray(
        rng.normal(size=table.shape) * scale, table.dtype)
  ids = jnp.asarray(rng.integers(5, 64, (2, 16)), jnp.int32)
  logits = {}
  for memory in ("device", "pinned_host"):
    model = pretrained.build_model(cfg, params, rngs=nnx.Rngs(0), table_memory=memory)
    kinds = {jax.typeof(state_at(nnx.state(model, nnx.Param), p)[...]).memory_space
             for p, _, _ in row_tables(cfg).values()}
    assert kinds == {jax.memory.Space.Host if memory == "pinned_host" else
                     jax.memory.Space.Device}
    graphdef, state = nnx.split(model)
    logits[memory] = jax.jit(lambda s, i: nnx.merge(graphdef, s)(
        i, jnp.ones_like(i), jnp.zeros_like(i))[0])(state, ids)
  np.testing.assert_allclose(logits["pinned_host"], logits["device"], rtol=1e-5, atol=1e-5)


def test_eval_workdir_with_host_tables(tmp_path):
  """eval.py's path (run_config + evaluate_workdir) with --config.mesh.table_memory=pinned_host:
  the table is restored into host memory and the metrics equal the device tables'."""
  config = tiny_config(**{"train.steps": 2, "train.eval_every": 2, "train.checkpoint_every": 2,
                          "train.memory_stats_every": 2, "train.log_every": 2})
  workdir = str(tmp_path)
  trainer.train_and_evaluate(config, workdir)
  got = {}
  for memory in ("device", "pinned_host"):
    run = evaluate.run_config(workdir, {"mesh.table_memory": memory}, config)
    got[memory] = evaluate.evaluate_workdir(run, workdir)
    model, _, _ = ckpt_lib.restore_model(workdir, table_memory=memory)
    assert model.bert.layers[1].memory.values[...].sharding.memory_kind == memory
  assert got["pinned_host"]["mlm_loss"] == pytest.approx(got["device"]["mlm_loss"], rel=1e-6)
  assert got["pinned_host"]["memory"] == got["device"]["memory"]


def test_training_and_split_tables_are_refused():
  with pytest.raises(ConfigError, match="inference only"):
    from pkm_jax import config as config_lib
    config_lib.validate(tiny_config(**{"mesh.table_memory": "pinned_host"}))
  # Rows split over two devices (conftest's 8 host devices): the program's own check.
  config = tiny_config(**{"mesh.table_memory": "pinned_host", "mesh.data": 2,
                          "mesh.rules": (("slots", ("data",)),)})
  with pytest.raises(ConfigError, match="whole tables"):
    trainer.build_train_program(config, 64)


# The eval forward (trainer.jit_eval_step) of a tiny model with a 65,536-row table, compiled for
# one device of PLATFORM: what the compiled program holds.
COMPILE = r"""
import json, re, sys
sys.path[:0] = ["tests", "."]
import jax, numpy as np
from test_trainer import tiny_config
from pkm_jax import deviceless, trainer
from pkm_jax.models.tables import row_tables

PLATFORM, KIND = sys.argv[1], sys.argv[2]
out = {}
for memory in ("device", "pinned_host"):
  config = tiny_config(**{"mesh.data": 1, "mesh.model": 1, "mesh.table_memory": memory,
                          "memory.n_keys": 256, "memory.kind": KIND})
  if PLATFORM == "tpu":
    devices = deviceless.target_devices("v5e:2x2")
  else:  # jax's CUDA topology lists no memory kinds: lowered on the CPU for cuda, then
    devices = jax.devices("cpu")  # compiled by XLA:GPU for an H100 (below)
  program = trainer.build_train_program(config, 64, devices=devices)
  state, batch = deviceless.abstract_inputs(program, config)
  with jax.set_mesh(program.mesh):
    lowered = trainer.jit_eval_step(program).trace(
        state.params, state.model_state, state.frozen, batch).lower(
        lowering_platforms=(PLATFORM,))
  if PLATFORM == "tpu":
    compiled = lowered.compile()
    hlo, mem = compiled.as_text(), compiled.memory_analysis()
  else:
    from jax._src import compiler
    from jax._src.lib import xla_client as xc
    gpu = deviceless.target_devices("h100:1")
    exe = gpu[0].client.compile(
        lowered.compiler_ir("stablehlo"), executable_devices=xc.DeviceList(tuple(gpu)),
        compile_options=compiler.get_compile_options(1, 1, device_assignment=np.array([gpu])))
    hlo, mem = exe.hlo_modules()[0].to_string(), exe.get_compiled_memory_stats()
  cfg = program.model_cfg
  shapes = [f"[{cfg.memory.n_slots},{w}]" for w in
            ([cfg.memory.v_dim, cfg.hidden_size] if KIND == "peer" else [cfg.memory.v_dim])]
  # Layouts given to arrays of a table's shape outside the host's own computations.
  device_blocks = [b for b in re.split(r"\n(?=%|ENTRY)", hlo) if 'execution_thread="host"' not in b]
  layouts = [m for b in device_blocks for s in shapes
             for m in re.findall(r"f32" + re.escape(s) + r"\{([^}]*)\}", b)]
  done = re.findall(r"= (.*?) custom-call-done\(", hlo)
  out[memory] = dict(
      table_bytes=deviceless.table_bytes(program)[0], tokens=config.data.batch_size
      * config.data.max_len, picks=cfg.memory.heads * cfg.memory.k,
      widths=[int(s.strip("[]").split(",")[1]) for s in shapes],
      host_args=mem.host_argument_size_in_bytes, args=mem.argument_size_in_bytes,
      temp=mem.temp_size_in_bytes, table_layouts=layouts,
      host_calls=hlo.count('custom_call_target="HostExecute"'),
      fetched=[int(np.prod([int(d) for d in dims.split(",")]))
               for t in done for dims in re.findall(r"f32\[([\d,]+)\]", t)])
print(json.dumps(out))
"""


def check_compiled(got: dict) -> None:
  dev, host = got["device"], got["pinned_host"]
  table = host["table_bytes"]
  # Positive control: device tables are device arguments, in device memory.
  assert dev["args"] >= table and dev["host_args"] == 0 and dev["host_calls"] == 0
  assert dev["table_layouts"] and not any("S(5)" in lay for lay in dev["table_layouts"])
  # Host tables: host arguments, every array of their shape on the device side in host memory
  # (S(5)), gathered by host calls.
  assert host["host_args"] >= table and host["host_calls"] >= 1
  assert host["table_layouts"] and all("S(5)" in lay for lay in host["table_layouts"])
  # What reaches the device: arguments and temporaries far below one table, and the host calls
  # return exactly the picks' rows: tokens x picks x width per table.
  assert host["args"] + host["temp"] < table / 2
  want = sorted(host["tokens"] * host["picks"] * w for w in host["widths"])
  assert sorted(host["fetched"]) == want, (host["fetched"], want)


@requires_libtpu
@pytest.mark.parametrize("kind", ["pkm", "peer"])
def test_eval_forward_compiles_for_tpu_with_host_tables(kind):
  check_compiled(run_json(COMPILE.replace("sys.argv[1], sys.argv[2]", f"'tpu', '{kind}'")))


def test_eval_forward_lowers_for_cuda_with_host_tables():
  """jax's CUDA lowering (no plugin needed): the tables are pinned-host arguments, the gather
  is marked for the host, the rows placed on the device; compiled by XLA:GPU where the
  plugin is installed (.cuda/)."""
  config = tiny_config(**{"mesh.data": 1, "mesh.model": 1, "mesh.table_memory": "pinned_host",
                          "memory.n_keys": 64})
  from pkm_jax import deviceless
  program = trainer.build_train_program(config, 64, devices=jax.devices()[:1])
  state, batch = deviceless.abstract_inputs(program, config)
  with jax.set_mesh(program.mesh):
    text = trainer.jit_eval_step(program).trace(
        state.params, state.model_state, state.frozen, batch).lower(
        lowering_platforms=("cuda",)).as_text()
  n, v = program.model_cfg.memory.n_slots, program.model_cfg.memory.v_dim
  assert re.search(rf"tensor<{n}x{v}xf32> {{mhlo.memory_kind = \"pinned_host\"", text)
  assert re.search(r"stablehlo.gather.*_xla_compute_type = \"host\"", text)
  assert '_xla_buffer_placement = "device"' in text  # the rows moved to the device
  env = cuda_env()
  if env is None:
    return
  proc = subprocess.run([sys.executable, "-c", COMPILE, "cuda", "pkm"], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  check_compiled(json.loads(proc.stdout.strip().splitlines()[-1]))
