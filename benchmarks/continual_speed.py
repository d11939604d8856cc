"""Step time of continued-training methods on this machine: sparse_memory (TF-IDF top-t
selection inside the step, row-sparse update of the selected rows) against memory (every picked
row, row-sparse Adam; and every row, dense Adam), full as a reference.

Each method's step is the one `train.py` runs (pkm_jax.trainer's program: configs/default.py
resized, one device, finetune.method set, a random MLM batch masked as pretraining masks). The
methods are timed round-robin, --repeats rounds of --steps steps each (after --warmup untimed
steps: compilation), so that a shared machine's slow spells hit them alike; each round's median
step time is one sample, and the table shows the median over rounds with its min-max spread,
and sparse_memory's ratio to memory in each round.

  python benchmarks/continual_speed.py               # configs/default.py sizes, a few minutes
  python benchmarks/continual_speed.py --quick       # tiny, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a plain script
from configs import default as default_config  # noqa: E402
from pkm_jax import config as config_lib  # noqa: E402
from pkm_jax import trainer  # noqa: E402
from pkm_jax.continual import slot_selection  # noqa: E402
from pkm_jax.data.mlm import mask_tokens  # noqa: E402

# (row name, finetune.method, optim.values_optimizer)
METHODS = (("sparse_memory", "sparse_memory", "sparse_adam"),
           ("memory (sparse Adam)", "memory", "sparse_adam"),
           ("memory (dense Adam)", "memory", "adam"),
           ("full (sparse Adam)", "full", "sparse_adam"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="tiny sizes, few steps (CI)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=64)
  p.add_argument("--n_keys", type=int, default=128, help="slots: n_keys**2")
  p.add_argument("--top_t", type=int, default=1000)
  p.add_argument("--steps", type=int, default=10, help="timed steps per round")
  p.add_argument("--repeats", type=int, default=5, help="rounds")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--out", default="", help="write the results as JSON here")
  args = p.parse_args(argv)
  if args.quick:
    args.batch, args.seq, args.n_keys, args.top_t = 8, 32, 16, 20
    args.steps, args.repeats, args.warmup = 2, 2, 2
  return args


def make_step(args: argparse.Namespace, method: str, values_optimizer: str):
  """() -> runs one train step of `method` (state carried and donated), blocking."""
  config = default_config.get_config()
  if args.quick:
    config.model.update(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    config.memory.update(layers=(1,), heads=2, k=4, k_dim=16)
  config.memory.n_keys = args.n_keys
  config.data.update(batch_size=args.batch, max_len=args.seq)
  config.optim.values_optimizer = values_optimizer
  config.finetune.update(method=method, top_t=args.top_t)
  config.train.memory_stats_every = 0
  config.mesh.update(data=1, model=1)
  vocab = config.data.vocab_size
  config_lib.validate(config, vocab_size=vocab)
  program = trainer.build_train_program(config, vocab)
  rng = np.random.default_rng(0)
  b, t = args.batch, args.seq
  masked = mask_tokens(rng.integers(5, vocab, (b, t), dtype=np.int32), rng,
                       mask_prob=config.data.mask_prob, mask_id=4, special_ids=np.arange(5),
                       vocab_size=vocab)
  batch = program.to_device({**masked, "attention_mask": np.ones((b, t), np.int32),
                             "token_type_ids": np.zeros((b, t), np.int32)})
  with jax.set_mesh(program.mesh):
    state = program.init_state()
  n_slots = args.n_keys ** 2
  for key in state.selection:  # a background sample's document frequencies (16 batches)
    state.selection[key] = {
        **state.selection[key],
        # Placed as the step returns them, so the second step does not compile again.
        slot_selection.DF: jax.device_put(rng.integers(0, 17, n_slots).astype(np.float32),
                                          program.replicated),
        slot_selection.N_BACKGROUND: jax.device_put(np.float32(16), program.replicated)}
  carry = [state]

  def run():
    with jax.set_mesh(program.mesh):
      carry[0], metrics, _ = program.train_step(carry[0], batch)
    jax.block_until_ready(metrics["loss"])

  return run


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  steps = {name: make_step(args, method, opt) for name, method, opt in METHODS}
  for run in steps.values():
    for _ in range(args.warmup):
      run()
  rounds: dict[str, list[float]] = {name: [] for name in steps}
  for _ in range(args.repeats):
    for name, run in steps.items():
      times = []
      for _ in range(args.steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
      rounds[name].append(statistics.median(times))
  ratios = [s / m for s, m in zip(rounds["sparse_memory"], rounds["memory (sparse Adam)"])]
  rows = {name: {"median_ms": 1e3 * statistics.median(r), "min_ms": 1e3 * min(r),
                 "max_ms": 1e3 * max(r), "rounds_ms": [1e3 * x for x in r]}
          for name, r in rounds.items()}
  result = {"device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
            "args": vars(args), "methods": rows,
            "sparse_over_memory_ratio": {"median": statistics.median(ratios),
                                         "min": min(ratios), "max": max(ratios),
                                         "rounds": ratios}}
  print(f"train step time, {result['platform']} ({result['device']}), batch {args.batch} x "
        f"{args.seq}, {args.n_keys ** 2} slots, top_t {args.top_t}; median over {args.repeats} "
        f"rounds of {args.steps} steps [min - max]")
  print(f"{'method':24s} {'ms / step':>12s} {'spread':>20s}")
  for name, r in rows.items():
    print(f"{name:24s} {r['median_ms']:12.2f} {r['min_ms']:9.2f} - {r['max_ms']:8.2f}")
  q = result["sparse_over_memory_ratio"]
  print(f"sparse_memory / memory (sparse Adam), per round: median {q['median']:.3f} "
        f"[{q['min']:.3f} - {q['max']:.3f}]")
  if args.out:
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
