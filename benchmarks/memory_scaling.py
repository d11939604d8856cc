"""Train-step time and peak host memory as the value table grows (16K -> 1M slots).

One fixed tiny encoder with one ResM memory layer; only `n_keys` changes (N = n_keys**2 slots).
The step is the trainer's own jitted step (`trainer.build_train_program`: state donated, one
device), with the values trained either by dense Adam (every row and both moments rewritten every
step: O(N)) or by sparse updates (`optim.values_optimizer='sparse_adam'`: only picked rows). The
batch is fixed and small enough that the picks (batch * seq * heads * k = 16,384) never exceed
the smallest table, so every configuration updates the same number of rows and only N varies.

Each configuration runs in a fresh subprocess, so its peak resident memory (ru_maxrss) is its own.
Timed: --steps jitted steps after --warmup untimed ones (the step is compiled before them), each
ended by block_until_ready; data are random ids made once, outside the timing. With --rounds R every
configuration runs R times, round-robin (so a slow spell of a shared machine hits all of them
alike), and its figures are the median (min) over all R * steps timed steps. The usage accumulators
(train.memory_stats_every, [N]-sized) are not part of the step and are not run.

  python benchmarks/memory_scaling.py                 # ~3 minutes on 2 CPU cores
  python benchmarks/memory_scaling.py --n_keys 128,1024 --optimizers sparse_adam
Writes benchmarks/results/memory_scaling.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script
TARGET_RATIO = 1.3  # sparse updates: step time at the largest table <= 1.3 x at the smallest
MEM_HEADS, MEM_K = 4, 16
PICKS_PER_TOKEN = MEM_HEADS * MEM_K


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n_keys", default="128,256,512,1024",
                 help="comma-separated sub-key counts (N = n_keys**2 slots)")
  p.add_argument("--optimizers", default="adam,sparse_adam",
                 help="comma-separated optim.values_optimizer settings")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=32)
  p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
  p.add_argument("--rounds", type=int, default=2,
                 help="fresh runs of every configuration, interleaved")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_scaling.json"))
  p.add_argument("--child", default="", help=argparse.SUPPRESS)  # "n_keys,optimizer"
  args = p.parse_args(argv)
  args.n_keys = [int(n) for n in args.n_keys.split(",")]
  args.optimizers = args.optimizers.split(",")
  bad = set(args.optimizers) - {"adam", "sparse_adam"}
  if bad:
    p.error(f"--optimizers: unknown {sorted(bad)} (use adam, sparse_adam)")
  if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
    p.error("--steps, --warmup and --rounds must be >= 1")
  picks = args.batch * args.seq * PICKS_PER_TOKEN
  if picks > min(args.n_keys) ** 2:
    p.error(f"--batch x --seq x {PICKS_PER_TOKEN} = {picks} picks per step exceed the smallest "
            f"table ({min(args.n_keys)}^2 slots): sizes would differ in rows updated, not only N")
  return args


def bench_config(n_keys: int, values_optimizer: str, args: argparse.Namespace):
  from configs import default as default_config  # pylint: disable=g-import-not-at-top

  config = default_config.get_config()
  config.model.update(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512,
                      max_position_embeddings=max(64, args.seq))
  config.memory.update(mode="residual", layers=(1,), n_keys=n_keys, heads=MEM_HEADS, k=MEM_K,
                       k_dim=64)
  config.data.update(batch_size=args.batch, max_len=args.seq)
  config.optim.values_optimizer = values_optimizer
  config.train.memory_stats_every = 0
  config.mesh.update(data=1, model=1)
  return config


def measure(n_keys: int, values_optimizer: str, args: argparse.Namespace) -> dict:
  """One configuration, in this (fresh) process."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pkm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from pkm_jax import trainer  # pylint: disable=g-import-not-at-top

  vocab = 2000
  config = bench_config(n_keys, values_optimizer, args)
  config_lib.validate(config, vocab_size=vocab)
  program = trainer.build_train_program(config, vocab)
  t0 = time.perf_counter()
  with jax.set_mesh(program.mesh):
    state = program.init_state()
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  peak_init_mib = _peak_rss_mib()

  rng = np.random.default_rng(0)
  b, t = args.batch, args.seq
  weights = (rng.random((b, t)) < 0.15).astype(np.float32)
  batch = {"input_ids": rng.integers(5, vocab, (b, t), dtype=np.int32),
           "attention_mask": np.ones((b, t), np.int32),
           "token_type_ids": np.zeros((b, t), np.int32),
           "mlm_labels": (rng.integers(5, vocab, (b, t)) * weights).astype(np.int32),
           "mlm_weights": weights}
  batch = jax.device_put(batch, program.batch_sharding)

  times, cpu_times = [], []
  with jax.set_mesh(program.mesh):
    # Compiled once here so that XLA's own account of its scratch memory can be reported.
    step = program.train_step.lower(state, batch).compile()
    temp_mib = step.memory_analysis().temp_size_in_bytes / 2**20
    for i in range(args.warmup + args.steps):
      t0, c0 = time.perf_counter(), time.process_time()
      state, metrics, _ = step(state, batch)
      jax.block_until_ready((state, metrics))
      if i >= args.warmup:
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
  if not np.isfinite(float(metrics["loss"])):
    raise FloatingPointError(f"loss is {float(metrics['loss'])} (n_keys={n_keys})")
  mem = program.model_cfg.memory
  return {"n_keys": n_keys, "slots": mem.n_slots, "values_optimizer": values_optimizer,
          "table_mib": mem.n_slots * mem.v_dim * 4 / 2**20, "step_s": times,
          "step_cpu_s": cpu_times, "xla_temp_mib": temp_mib, "init_s": init_s,
          "peak_rss_after_init_mib": peak_init_mib, "peak_rss_mib": _peak_rss_mib()}


def summarize(runs: list[dict]) -> dict:
  """The rounds of one configuration -> one row: times pooled over rounds, memory at its worst."""
  times = [t for r in runs for t in r["step_s"]]
  cpu_times = [t for r in runs for t in r["step_cpu_s"]]
  row = {k: v for k, v in runs[0].items() if k not in ("step_s", "step_cpu_s")}
  row.update(
      rounds=len(runs), step_ms_median=1e3 * statistics.median(times), step_ms_min=1e3 * min(times),
      step_ms_round_medians=[1e3 * statistics.median(r["step_s"]) for r in runs],
      step_cpu_ms_median=1e3 * statistics.median(cpu_times),
      init_s=max(r["init_s"] for r in runs),
      peak_rss_after_init_mib=max(r["peak_rss_after_init_mib"] for r in runs),
      peak_rss_mib=max(r["peak_rss_mib"] for r in runs))
  return row


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_child(n_keys: int, values_optimizer: str, args: argparse.Namespace) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), f"--child={n_keys},{values_optimizer}",
         f"--batch={args.batch}", f"--seq={args.seq}", f"--steps={args.steps}",
         f"--warmup={args.warmup}"]
  # One CPU device: the benchmark is about N, not about partitioning.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.setdefault("JAX_PLATFORMS", "cpu")
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
  if out.returncode != 0:
    raise RuntimeError(f"n_keys={n_keys} {values_optimizer} failed: "
                       f"{out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ''}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict]) -> str:
  lines = ["| slots | table MiB | values optimizer | step ms median (min) | CPU ms/step | "
           "XLA temp MiB | peak RSS MiB (after init) |",
           "|---:|---:|---|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['slots']:,} | {r['table_mib']:.0f} | {r['values_optimizer']} | "
                 f"{r['step_ms_median']:.1f} ({r['step_ms_min']:.1f}) | "
                 f"{r['step_cpu_ms_median']:.1f} | {r['xla_temp_mib']:.0f} | "
                 f"{r['peak_rss_mib']:.0f} ({r['peak_rss_after_init_mib']:.0f}) |")
  return "\n".join(lines)


def ratios(rows: list[dict], key: str) -> dict[str, float]:
  """rows[key] at the largest table / at the smallest, per optimizer."""
  out = {}
  for opt in sorted({r["values_optimizer"] for r in rows}):
    mine = sorted((r for r in rows if r["values_optimizer"] == opt), key=lambda r: r["slots"])
    if len(mine) > 1:
      out[opt] = mine[-1][key] / mine[0][key]
  return out


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  if args.child:
    n_keys, opt = args.child.split(",")
    print(json.dumps(measure(int(n_keys), opt, args)))
    return
  configs = [(opt, n) for opt in args.optimizers for n in args.n_keys]
  runs = {c: [] for c in configs}
  for i in range(args.rounds):
    for opt, n in configs:
      r = run_child(n, opt, args)
      runs[opt, n].append(r)
      print(f"  round {i + 1}/{args.rounds} {opt:12s} {r['slots']:>9,} slots: "
            f"{1e3 * statistics.median(r['step_s']):.1f} ms/step, {r['peak_rss_mib']:.0f} MiB peak",
            file=sys.stderr, flush=True)
  rows = [summarize(runs[c]) for c in configs]
  result = {"setup": {"batch": args.batch, "seq": args.seq, "steps": args.steps,
                      "warmup": args.warmup, "rounds": args.rounds, "hidden": 128, "layers": 2,
                      "memory_layers": [1],
                      "mem_heads": MEM_HEADS, "k": MEM_K,
                      "picks_per_step": args.batch * args.seq * PICKS_PER_TOKEN,
                      "devices": "1 CPU device"},
            "rows": rows, "target_sparse_ratio": TARGET_RATIO,
            "ratio_largest_to_smallest": {key: ratios(rows, key) for key in (
                "step_ms_median", "step_ms_min", "step_cpu_ms_median")}}
  print(markdown(rows))
  sizes = sorted({r["slots"] for r in rows})
  print(f"\nstep time at {sizes[-1]:,} / at {sizes[0]:,} slots "
        f"(target for sparse_adam: <= {TARGET_RATIO}x):")
  for opt in args.optimizers:
    got = {key: r.get(opt) for key, r in result["ratio_largest_to_smallest"].items()}
    if got["step_ms_median"] is not None:
      print(f"  {opt:12s} median {got['step_ms_median']:.2f}x, min {got['step_ms_min']:.2f}x, "
            f"CPU time {got['step_cpu_ms_median']:.2f}x")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"\nsaved {args.out}")


if __name__ == "__main__":
  main()
