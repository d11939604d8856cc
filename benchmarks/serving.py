"""Serving memory models with quantised tables (issue 30): per model and table dtype, the table
bytes, peak process memory, inference throughput and quality against float32.

Models (each trained here, briefly, on the generated corpus, so that its memory matters; sizes
that fit a shared 2-core CPU in minutes):
  default   configs/default.py as is: hidden 128, 4 layers, ResM at layers 1 and 3, 128² slots;
  resm      BERT-base +ResM's memory on a smaller BERT: hidden 256, 4 layers, ResM at layers 1
            and 3, 128² slots, 4 heads, k = 32, k_dim 256 (the paper's heads, k and k_dim);
            batch 16: the tables are ~70% of the parameters (BERT-base +ResM: 405M of 515M);
  peer      the same with PEER's two tables per layer (memory.kind=peer).
--quick: one tiny model (hidden 32, 2 layers, 16² slots), a few steps.

Dtypes: fp32 (the trained workdir), bf16 (the same tables restored as bfloat16), int8 and fp8
(`python -m pkm_jax.quantize --dtype int8 | fp8`: int8 / float8_e4m3fn rows with a float32 scale
per row). Each (model, dtype) row runs in its own process (peak memory: its ru_maxrss, jax's
runtime included) and reports:
  table_bytes   every row table (and its scales) as stored;
  tokens/s      the jitted forward to logits on the held-out batches (batch x max_len tokens a
                batch), --repeats passes after a warm-up: median and range over passes;
  perplexity    held-out MLM perplexity (the eval split's masked positions, as eval.py);
  agreement     fill-mask top-1 agreement with fp32 on those masked positions;
  zeroed        fp32's perplexity with the memory's value tables zeroed (its output is then 0):
                how much the memory matters; `ratio` = |ppl - ppl_fp32| / (zeroed - ppl_fp32).

  python benchmarks/serving.py --out /tmp/serving            # ~45 min on a shared 2-core CPU
  python benchmarks/serving.py --quick --out /tmp/serving_quick
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script

DTYPES = ("fp32", "bf16", "int8", "fp8")
QUANTIZE = {"int8": "int8", "fp8": "fp8"}  # --dtype of pkm_jax.quantize
# The targets: int8 (fp8 stated the same way) against fp32.
TARGETS = {"table_bytes_ratio": 0.26, "perplexity_change": 0.005, "agreement": 0.99,
           "speed_ratio": 1.0}
TINY = {"model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 2,
        "model.intermediate_size": 64, "model.max_position_embeddings": 32,
        "memory.layers": (1,), "memory.n_keys": 16, "memory.heads": 2, "memory.k": 4,
        "memory.k_dim": 16, "data.vocab_size": 300, "data.max_len": 32, "data.batch_size": 8,
        "data.generated.num_entities": 40, "data.generated.num_docs": 300}
SCALED_BASE = {"model.hidden_size": 256, "model.num_layers": 4, "model.num_heads": 4,
               "model.intermediate_size": 1024, "memory.layers": (1, 3), "memory.n_keys": 128,
               "memory.heads": 4, "memory.k": 32, "memory.k_dim": 256, "data.batch_size": 16}
MODELS = {"default": {}, "resm": SCALED_BASE, "peer": {**SCALED_BASE, "memory.kind": "peer"}}
STEPS = {"default": 300, "resm": 150, "peer": 150, "tiny": 6}  # training steps per model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True, help="folder for workdirs, results.json and the table")
  p.add_argument("--quick", action="store_true", help="one tiny model, a few steps (< ~90 s)")
  p.add_argument("--models", default=",".join(MODELS))
  p.add_argument("--dtypes", default=",".join(DTYPES))
  p.add_argument("--steps", type=int, default=0, help="training steps per model (0: STEPS)")
  p.add_argument("--eval_batches", type=int, default=20)
  p.add_argument("--repeats", type=int, default=3, help="timed passes over the eval batches")
  p.add_argument("--row", default="", help=argparse.SUPPRESS)  # a child: one row's JSON spec
  args = p.parse_args(argv)
  if args.quick:
    args.models, args.eval_batches, args.repeats = "tiny", 2, 2
  bad = [d for d in args.dtypes.split(",") if d not in DTYPES]
  if bad:
    p.error(f"--dtypes: {bad} not in {DTYPES}")
  return args


def overrides(name: str, args: argparse.Namespace) -> dict:
  """The model's --config.* overrides (configs/default.py underneath) and the run's lengths."""
  model = TINY if name == "tiny" else MODELS[name]
  every = args.steps or STEPS[name]
  return {**model, "train.steps": every, "train.eval_every": every,
          "train.checkpoint_every": every, "train.log_every": every,
          "train.memory_stats_every": every, "train.eval_batches": 2,
          "optim.warmup_steps": min(100, max(every // 10, 1))}


def run(cmd: list[str], log: pathlib.Path) -> None:
  with open(log, "w") as f:
    proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
  if proc.returncode:
    raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}): see {log}")


def train(name: str, args: argparse.Namespace, out: pathlib.Path) -> pathlib.Path:
  """The model's workdir, trained (train.py resumes, so a finished one is reused)."""
  workdir = out / "work" / name
  settings = overrides(name, args)
  if (workdir / "checkpoints" / str(settings["train.steps"])).is_dir():
    return workdir  # trained to the end already (train.py would restore it to evaluate)
  flags = [f"--config.{k}={v}" for k, v in settings.items()]
  start = time.perf_counter()
  run([sys.executable, "train.py", "--config", "configs/default.py", "--workdir", str(workdir),
       *flags], out / f"train-{name}.log")
  print(f"trained {name}: {time.perf_counter() - start:.0f} s", flush=True)
  return workdir


def quantize(workdir: pathlib.Path, dtype: str, out: pathlib.Path) -> pathlib.Path | None:
  """`python -m pkm_jax.quantize` of the workdir (None where that command does not exist)."""
  if importlib.util.find_spec("pkm_jax.quantize") is None:
    return None
  target = workdir.parent / f"{workdir.name}-{dtype}"
  if not target.exists():
    run([sys.executable, "-m", "pkm_jax.quantize", "--model", str(workdir), "--out",
         str(target), "--dtype", QUANTIZE[dtype]], out / f"quantize-{workdir.name}-{dtype}.log")
  return target


# ---------------------------------------------------------------------------------------------
# One row, in its own process
# ---------------------------------------------------------------------------------------------


def measure_row(spec: dict) -> dict:
  """Loads spec['workdir'] (tables cast to bf16 when spec['cast'] says so), evaluates, times;
  the peak memory is read before anything else is loaded (the zeroed tables, the reference)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from pkm_jax import checkpoint as ckpt_lib
  from pkm_jax import data as data_lib
  from pkm_jax import evaluate
  from pkm_jax.data.tokenizer import load_tokenizer
  from pkm_jax.models.registry import build_lm
  from pkm_jax.models.tables import map_row_tables, row_tables

  def load(workdir: str, cast: bool):
    cfg = ckpt_lib.read_model_config(workdir)
    model = nnx.eval_shape(lambda: build_lm(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, model_state = nnx.split(model, nnx.Param, nnx.BatchStat)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    place = lambda x, dtype=None: jax.ShapeDtypeStruct(  # noqa: E731
        x.shape, dtype or x.dtype, sharding=sharding)
    target = jax.tree.map(place, params)
    if cast:  # restored straight into bf16 (orbax casts): no float32 copy held
      target = map_row_tables(target, cfg, lambda x: place(x, jnp.bfloat16))
    restored = ckpt_lib.restore_items(ckpt_lib.make_manager(workdir, read_only=True),
                                      ckpt_lib.latest_step(workdir, None),
                                      {"params": target,
                                       "model_state": jax.tree.map(place, model_state)})
    return cfg, graphdef, restored["params"], restored["model_state"]

  workdir = spec["workdir"]
  cfg, graphdef, params, model_state = load(workdir, spec["cast"])
  tokenizer = load_tokenizer(os.path.join(workdir, "tokenizer.json"))
  # Every memory array as stored: row tables and (quantised) their per-row scales.
  table_bytes = sum(
      x.nbytes for path, x in jax.tree_util.tree_leaves_with_path(params)
      if "memory" in jax.tree_util.keystr(path) and x.ndim >= 1
      and x.shape[0] == cfg.memory.n_slots)

  config = evaluate.run_config(workdir, {}, None)
  batches = [jax.tree.map(jnp.asarray, b) for b in
             data_lib.make_eval_data(config.data, tokenizer)(spec["eval_batches"])]

  def logits_fn(graphdef, params, model_state, batch):
    model = nnx.merge(graphdef, params, model_state)
    return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])[0]

  forward = jax.jit(logits_fn, static_argnums=0)

  @jax.jit
  def scores(params, model_state, batch):
    logits = logits_fn(graphdef, params, model_state, batch).astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["mlm_labels"][..., None],
                               axis=-1)[..., 0]
    w = batch["mlm_weights"]
    return jnp.sum(nll * w), jnp.sum(w), jnp.argmax(logits, axis=-1)

  def perplexity(params):
    nll, count, top1 = 0.0, 0.0, []
    for b in batches:
      s, c, t = scores(params, model_state, b)
      nll, count = nll + float(s), count + float(c)
      top1.append(np.asarray(t)[np.asarray(b["mlm_weights"]) > 0])
    return float(np.exp(nll / count)), np.concatenate(top1)

  def one_pass(graphdef, params, model_state) -> float:
    start = time.perf_counter()
    for b in batches:
      jax.block_until_ready(forward(graphdef, params, model_state, b))
    return time.perf_counter() - start

  ppl, top1 = perplexity(params)
  np.save(spec["preds"], top1)
  result = dict(table_bytes=int(table_bytes), perplexity=ppl, masked=int(top1.size),
                table_rows=cfg.memory.n_slots * len(row_tables(cfg)))
  one_pass(graphdef, params, model_state)  # compiled, warm
  tokens = sum(int(b["input_ids"].size) for b in batches)
  rates = [tokens / one_pass(graphdef, params, model_state) for _ in range(spec["repeats"])]
  result.update(tokens_per_s=statistics.median(rates), tokens_per_s_range=[min(rates),
                                                                         max(rates)],
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  if spec["zeroed"]:  # the memory's output zeroed: value tables of zeros
    zeroed = map_row_tables(params, cfg, lambda x: jnp.zeros_like(x))
    result["zeroed_perplexity"] = perplexity(zeroed)[0]
  if spec.get("reference"):
    # Speed against fp32 in this process, passes alternating (which goes first swaps each
    # round): a shared machine's swings slow both alike. Per round fp32 time / this time.
    ref = load(spec["reference"], False)
    one_pass(*ref[1:])
    ratios = []
    for i in range(spec["repeats"]):
      order = [(ref[1:], "ref"), ((graphdef, params, model_state), "row")]
      times = {name: one_pass(*args) for args, name in (order if i % 2 else order[::-1])}
      ratios.append(times["ref"] / times["row"])
    result.update(paired_speed_ratio=statistics.median(ratios),
                  paired_speed_ratio_range=[min(ratios), max(ratios)])
  return result


def row(spec: dict, out: pathlib.Path) -> dict:
  """measure_row in a child process (its own peak memory); a row measured before with the same
  spec (in --out) is reused, so an interrupted run goes on where it stopped."""
  tag = f"{spec['model']}-{spec['dtype']}"
  path = out / "rows" / f"{tag}.json"
  done = path.with_suffix(".result.json")
  if done.exists() and path.exists() and json.loads(path.read_text()) == spec:
    return json.loads(done.read_text())
  (out / "rows").mkdir(parents=True, exist_ok=True)
  done.unlink(missing_ok=True)
  path.write_text(json.dumps(spec))
  run([sys.executable, __file__, "--out", str(out), "--row", str(path)], out / f"row-{tag}.log")
  return json.loads(path.with_suffix(".result.json").read_text())


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  out = pathlib.Path(args.out)
  if args.row:
    spec = json.loads(pathlib.Path(args.row).read_text())
    result = measure_row(spec)
    pathlib.Path(args.row).with_suffix(".result.json").write_text(json.dumps(result))
    return result
  out.mkdir(parents=True, exist_ok=True)
  rows = []
  for name in args.models.split(","):
    workdir = train(name, args, out)
    fp32 = None
    for dtype in args.dtypes.split(","):
      source = quantize(workdir, dtype, out) if dtype in QUANTIZE else workdir
      if source is None:
        print(f"{name} {dtype}: pkm_jax.quantize not available, row skipped", flush=True)
        continue
      spec = dict(model=name, dtype=dtype, workdir=str(source), cast=dtype == "bf16",
                  zeroed=dtype == "fp32", eval_batches=args.eval_batches,
                  reference=str(workdir) if dtype != "fp32" else "",
                  repeats=args.repeats, preds=str(out / "rows" / f"{name}-{dtype}.npy"))
      r = {**spec, **row(spec, out)}
      if dtype == "fp32":
        fp32 = r
      rows.append(r)
      if fp32 is not None:
        compare(r, fp32)
      print(json.dumps({k: r[k] for k in ("model", "dtype", "perplexity", "tokens_per_s")}),
            flush=True)
  report = dict(args=vars(args), targets=TARGETS, rows=rows)
  (out / "results.json").write_text(json.dumps(report, indent=1))
  print(table(rows))
  return report


def compare(r: dict, fp32: dict) -> None:
  """r's figures against its model's fp32 row (in place)."""
  import numpy as np
  mine, ref = np.load(r["preds"]), np.load(fp32["preds"])
  r["agreement"] = float(np.mean(mine == ref))
  r["zeroed_perplexity"] = fp32["zeroed_perplexity"]
  r["table_bytes_ratio"] = r["table_bytes"] / fp32["table_bytes"]
  r["perplexity_change"] = r["perplexity"] / fp32["perplexity"] - 1
  # How much the memory matters: zeroing it raises perplexity by memory_effect (if > 0; a
  # briefly trained memory may not help yet, then the ratio says nothing about quality).
  memory_effect = fp32["zeroed_perplexity"] - fp32["perplexity"]
  r["memory_helps"] = memory_effect > 0
  r["ratio_to_memory"] = (abs(r["perplexity"] - fp32["perplexity"]) / abs(memory_effect)
                          if memory_effect else None)
  # Measured side by side in r's process where it could be (alternating passes), else from the
  # two processes' rates.
  r["speed_ratio"] = r.get("paired_speed_ratio", r["tokens_per_s"] / fp32["tokens_per_s"])


def table(rows: list[dict]) -> str:
  lines = ["| model | dtype | table MB | x fp32 | peak RSS MB | tokens/s (range) | speed x fp32 | "
           "perplexity | change | top-1 agree | zeroed ppl | change / memory's |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    ratio = r.get("ratio_to_memory")
    lines.append(
        f"| {r['model']} | {r['dtype']} | {r['table_bytes'] / 1e6:.2f} | "
        f"{r['table_bytes_ratio']:.3f} | {r['peak_rss_mb']:.0f} | {r['tokens_per_s']:,.0f} "
        f"({r['tokens_per_s_range'][0]:,.0f}-{r['tokens_per_s_range'][1]:,.0f}) | "
        f"{r['speed_ratio']:.2f} | {r['perplexity']:.3f} | {100 * r['perplexity_change']:+.4f}% | "
        f"{100 * r['agreement']:.2f}% | {r['zeroed_perplexity']:.3f} | "
        f"{'-' if ratio is None else f'{ratio:.4f}'}"
        f"{'' if r['memory_helps'] else ' (memory not helping)'} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
