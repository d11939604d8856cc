"""One run for a GPU or TPU: the memory layer's component table and the BERT throughput table, at
BERT-base and BERT-large sizes, in bf16, each with the XLA lookup and the Pallas kernel.

Runs `memory_layer.py` and `throughput.py` in this process and stops starting new ones once
--budget_s has passed, so the whole set fits a short lease of an accelerator. A run that fails
(a kernel this device cannot compile) is recorded with its error and the next one starts; the
JSON is rewritten after every run and lists failed and skipped runs, never silently missing:

  for lookup in xla, pallas:   (the baselines first)
    for size in base, large:
      memory_layer.py   --dtype bfloat16, tokens 8,192 (64 x 128)
      throughput.py     --dtype bfloat16 --value_dtype bfloat16, batch 64 x 128, BERT/+PKM/+ResM
                        (pallas: BERT/+ResM; the ratio needs BERT in the same run), and
                        train.py's own step with sparse value updates

  python benchmarks/accelerator.py          # on the accelerator; writes results/accelerator.json
  python benchmarks/accelerator.py --tiny   # seconds on a CPU: the same runs at tiny sizes,
                                            # the Pallas kernels in interpret mode
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a plain script
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # the sibling scripts
import memory_layer  # noqa: E402
import throughput  # noqa: E402

from pkm_jax import host_memory  # noqa: E402

# Model sizes (configs/bert_base*.py, configs/bert_large*.py: memory in the middle and upper
# layers); the memory is the paper's: 512**2 slots, 4 heads, k 32, k_dim 256.
SIZES = {
    "base": dict(hidden=768, layers=12, heads=12, intermediate=3072, memory_layers="3,7"),
    "large": dict(hidden=1024, layers=24, heads=16, intermediate=4096, memory_layers="11,19"),
}
MEMORY = dict(n_keys=512, mem_heads=4, k=32, k_dim=256)
TINY_SIZE = dict(hidden=32, layers=2, heads=2, intermediate=64, memory_layers="0,1")
TINY_MEMORY = dict(n_keys=8, mem_heads=2, k=4, k_dim=16)


def plan(args: argparse.Namespace) -> list[tuple[str, object, list[str]]]:
  """(name, script module, argv) of every run, in the order they run: the XLA runs first (the
  baselines), then the Pallas ones, each BERT-base before BERT-large."""
  sizes = {"tiny": TINY_SIZE} if args.tiny else SIZES
  mem = TINY_MEMORY if args.tiny else MEMORY
  steps = ["--steps", "1", "--warmup", "1"] if args.tiny else ["--steps", "10", "--warmup", "2"]
  batch = ["--batch", "2", "--seq", "16", "--vocab", "200"] if args.tiny else [
      "--batch", "64", "--seq", "128"]
  runs = []
  for kernel in ("xla", "pallas"):
    for size, dims in sizes.items():
      # The paper's memory is memory_layer.py's default; the width is the model's.
      layer_argv = (["--tiny"] if args.tiny else
                    ["--hidden", str(dims["hidden"]), "--tokens", "8192"] + steps)
      runs.append((f"memory_layer {size} {kernel}", memory_layer,
                   layer_argv + ["--dtype", "bfloat16", "--lookup_kernel", kernel]))
      models = "BERT,+PKM,+ResM" if kernel == "xla" else "BERT,+ResM"
      argv = [f"--{k}={v}" for k, v in {**dims, **mem}.items()] + batch + steps + [
          "--dtype", "bfloat16", "--value_dtype", "bfloat16", "--models", models,
          "--lookup_kernel", kernel, "--values_optimizer", "sparse_adam"]
      runs.append((f"throughput {size} {kernel}", throughput, argv))
  return runs


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke run on any machine")
  p.add_argument("--budget_s", type=float, default=270.0,
                 help="start no new run after this many seconds (the set should end in < 5 min)")
  p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" /
                                      "accelerator.json"))
  args = p.parse_args(argv)
  device = jax.devices()[0]
  print(f"{device.device_kind} ({device.platform}) x{jax.device_count()}, jax {jax.__version__}",
        flush=True)
  start = time.perf_counter()
  report = dict(device=device.device_kind, platform=device.platform,
                device_count=jax.device_count(), jax_version=jax.__version__, total_seconds=0.0,
                runs=[], failed=[], skipped=[])
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    for i, (name, script, run_argv) in enumerate(plan(args)):
      if time.perf_counter() - start > args.budget_s:
        report["skipped"].append(dict(name=name, argv=run_argv))
        print(f"\n== {name}: skipped (past --budget_s {args.budget_s:.0f} s)", flush=True)
        continue
      print(f"\n== {name}", flush=True)
      run_start = time.perf_counter()
      try:
        results = script.main(run_argv + ["--out", f"{tmp}/{i}.json"])
      except Exception as e:  # pylint: disable=broad-except
        # A kernel that does not compile on this device must not cost the other runs.
        report["failed"].append(dict(name=name, argv=run_argv, error=f"{type(e).__name__}: {e}"))
        print(f"== {name}: FAILED: {type(e).__name__}: {str(e)[:2000]}", flush=True)
      else:
        report["runs"].append(dict(name=name, argv=run_argv,
                                   seconds=time.perf_counter() - run_start, results=results))
      report["total_seconds"] = time.perf_counter() - start
      out.write_text(json.dumps(report, indent=2) + "\n")  # after every run: a lease may end
  report["total_seconds"] = time.perf_counter() - start
  out.write_text(json.dumps(report, indent=2) + "\n")
  print(f"\n{len(report['runs'])} runs in {report['total_seconds']:.0f} s, "
        f"{len(report['failed'])} failed, {len(report['skipped'])} skipped; wrote {out}")
  return report

if __name__ == "__main__":
  host_memory.reexec_with_huge_pages()  # as train.py does (pkm_jax/cli.py)
  main()
