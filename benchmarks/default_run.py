"""The default `python train.py` timed against a baseline checkout, in alternating pairs.

  python benchmarks/default_run.py --baseline /path/to/other/checkout [--pairs 3]
      [--steps 300] [--env PKM_JAX_HUGE_PAGES=1] [--train_args '...'] [--out FILE.json]

Runs `python train.py --workdir <fresh> [--config.train.steps=N]` in this checkout (A) and in
the baseline's (B) in turn, A B, B A, A B ..., each a whole process from start to exit (start-up,
data generation, compilation, steps, checkpoints and evaluations included), so a drift of the
machine's speed during the call moves both sides of a pair alike. Prints each pair and the
ratio B/A (A's speed-up over B: above 1, A is faster), their median, min and max, and saves the
same as JSON. `--env K=V` applies to A only (e.g. an opt-in); B runs with the environment as it
is. Each process is one Python, as a user starts it (its own options decide the rest).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(checkout: str, steps: int, env: dict[str, str], extra: list[str]) -> float:
  """Seconds of one `python train.py` in `checkout` on a fresh workdir (raises on failure)."""
  with tempfile.TemporaryDirectory(prefix="default_run-") as tmp:
    cmd = [sys.executable, "train.py", f"--workdir={tmp}/w", *extra]
    if steps:
      cmd.append(f"--config.train.steps={steps}")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} in {checkout} failed: {proc.stderr[-2000:]}")
  return seconds


def summary(xs: list[float]) -> dict[str, float]:
  return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--baseline", required=True, help="another checkout of pkm-jax (B)")
  parser.add_argument("--pairs", type=int, default=3)
  parser.add_argument("--steps", type=int, default=0, help="train.steps (0: the config's)")
  parser.add_argument("--env", action="append", default=[], help="K=V for A only")
  parser.add_argument("--train_args", default="", help="more train.py flags, for both")
  parser.add_argument("--out", default=os.path.join(HERE, "benchmarks", "default_run.json"))
  args = parser.parse_args()
  base_env = dict(os.environ)
  a_env = {**base_env, **dict(kv.split("=", 1) for kv in args.env)}
  extra = shlex.split(args.train_args)
  rows = []
  print(f"A: {HERE} {' '.join(args.env)}\nB: {os.path.abspath(args.baseline)}\n"
        f"steps: {args.steps or 'the config default'}\n\n| pair | A s | B s | B/A |\n|---|---|---|---|",
        flush=True)
  for pair in range(1, args.pairs + 1):
    # Which side goes first alternates, so an order effect (caches, the VM warming) lands on
    # both sides alike.
    if pair % 2:
      a = run_once(HERE, args.steps, a_env, extra)
      b = run_once(os.path.abspath(args.baseline), args.steps, base_env, extra)
    else:
      b = run_once(os.path.abspath(args.baseline), args.steps, base_env, extra)
      a = run_once(HERE, args.steps, a_env, extra)
    rows.append({"pair": pair, "a_s": a, "b_s": b, "speedup": b / a})
    print(f"| {pair} | {a:.1f} | {b:.1f} | {b / a:.3f} |", flush=True)
  result = {"a": HERE, "a_env": args.env, "b": os.path.abspath(args.baseline),
            "steps": args.steps, "train_args": extra, "pairs": rows,
            "a_s": summary([r["a_s"] for r in rows]), "b_s": summary([r["b_s"] for r in rows]),
            "speedup": summary([r["speedup"] for r in rows])}
  s = result["speedup"]
  print(f"\nB/A median {s['median']:.3f} (min {s['min']:.3f}, max {s['max']:.3f}) over "
        f"{len(rows)} pairs")
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
