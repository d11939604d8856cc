"""Speed of one GPT-2 without memory and with ResM (memory beside the MLP at two layers):
inference, training and KV-cache generation, as ratios of +ResM to the dense model (issue 28).

GPT-2 small sizes by default (vocab 50257, hidden 768, 12 layers, 12 heads, 1024 positions) and
the paper's memory (Kim & Jung 2020: 512² slots, 4 heads, k = 32, k_dim 256; query LayerNorm)
at layers 5 and 9 (0-based; scaled to --layers), float32, random weights and tokens (speed does
not depend on them):
  inference   jitted forward to logits [B, T, V] on a [batch, seq] batch, eval mode;
  training    jitted value_and_grad of the next-token cross-entropy (dropout on, as GPT-2's
              0.1) + optax AdamW on every parameter (the value tables too, densely), params and
              optimizer state donated;
  generation  `pkm_jax.generate.generate` (greedy, no EOS stop: always --new_tokens) of a
              --prompt-token prompt, at batch 1 and at --gen_batch; tokens/s = batch x
              new_tokens / wall time of the call (prefill included), after a warm-up call
              (compilation excluded).
Each measurement runs --rounds rounds; in a round the two models alternate step by step
(round-robin, so a shared machine's swings slow both alike; which goes first swaps from round
to round) for --steps timed steps after --warmup untimed ones, and the round's figure is each
model's median step. The ratio is taken
per round (dense time / ResM time); the table shows the median over rounds and their range.

  python benchmarks/decoder_speed.py    # GPT-2 small: 9-17 min and 12 GB on a shared 2-core CPU
  python benchmarks/decoder_speed.py --hidden 256 --layers 4 --heads 4 --intermediate 1024 \
      --vocab 8192 --n_keys 128             # two minutes there, 1.7 GB
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a plain script
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # the sibling scripts
from pkm_jax import host_memory  # noqa: E402
from pkm_jax.architecture import MemoryConfig, ModelConfig  # noqa: E402
from pkm_jax.generate import generate  # noqa: E402
from pkm_jax.models.registry import build_lm  # noqa: E402
from throughput import count_memory_params, count_params  # noqa: E402

MODELS = (("GPT-2", "none"), ("+ResM", "residual"))
# Issue 28's targets on this project's CPU (benchmark figures, not timed tests).
TARGETS = {"inference": 0.85, "generation": 0.80}
DEFAULT_MEMORY_LAYERS = (5, 9)  # of 12: scaled to --layers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--vocab", type=int, default=50257)
  p.add_argument("--hidden", type=int, default=768)
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--intermediate", type=int, default=3072)
  p.add_argument("--positions", type=int, default=1024)
  p.add_argument("--n_keys", type=int, default=512)
  p.add_argument("--mem_heads", type=int, default=4)
  p.add_argument("--k", type=int, default=32)
  p.add_argument("--k_dim", type=int, default=256)
  p.add_argument("--memory_layers", default="",
                 help="comma-separated 0-based indices; default: 5 and 9 of 12, scaled to "
                      "--layers")
  p.add_argument("--batch", type=int, default=4, help="inference and training batch")
  p.add_argument("--seq", type=int, default=256, help="inference and training length")
  p.add_argument("--prompt", type=int, default=32, help="generation: prompt tokens")
  p.add_argument("--new_tokens", type=int, default=64, help="generation: tokens generated")
  p.add_argument("--gen_batch", type=int, default=4,
                 help="generation's second batch size (the first is 1)")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=2, help="timed steps per model and round")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation)")
  p.add_argument("--skip_train", action="store_true",
                 help="no training rows (AdamW on the paper's tables needs ~10 GB)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" /
                                      "decoder_speed.json"))
  args = p.parse_args(argv)
  if args.memory_layers:
    args.memory_layers = tuple(int(i) for i in args.memory_layers.split(","))
  else:
    args.memory_layers = tuple(sorted({max(0, round(args.layers * (i + 1) / 12) - 1)
                                       for i in DEFAULT_MEMORY_LAYERS}))
  if len(set(args.memory_layers)) != len(args.memory_layers):
    p.error(f"--memory_layers {args.memory_layers} has duplicates")
  if any(not 0 <= i < args.layers for i in args.memory_layers):
    p.error(f"--memory_layers {args.memory_layers} out of range for --layers {args.layers}")
  if args.k > args.n_keys:
    p.error(f"--k {args.k} exceeds --n_keys {args.n_keys}")
  if max(args.seq, args.prompt + args.new_tokens) > args.positions:
    p.error(f"--seq {args.seq} or --prompt + --new_tokens {args.prompt + args.new_tokens} "
            f"exceeds --positions {args.positions}")
  if min(args.rounds, args.steps, args.batch, args.seq, args.prompt, args.new_tokens,
         args.gen_batch) < 1 or args.warmup < 0:
    p.error("--rounds, --steps, --batch, --seq, --prompt, --new_tokens, --gen_batch must be "
            ">= 1 and --warmup >= 0")
  return args


def model_config(args: argparse.Namespace, mode: str) -> ModelConfig:
  return ModelConfig(
      family="gpt2", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
      num_heads=args.heads, intermediate_size=args.intermediate,
      max_position_embeddings=args.positions, layer_norm_eps=1e-5, memory_mode=mode,
      memory_layers=args.memory_layers if mode != "none" else (),
      memory=MemoryConfig(n_keys=args.n_keys, heads=args.mem_heads, k=args.k, k_dim=args.k_dim,
                          v_dim=args.hidden, query_norm="layernorm"))


def timed_rounds(steps: list[Callable[[], object]], args: argparse.Namespace
                 ) -> list[list[float]]:
  """Seconds per round of each step [model][round]: its median over --steps calls, the models
  called alternately (after --warmup untimed calls each), which one goes first swapped from
  round to round (so neither always runs just after the other's frees)."""
  for step in steps:
    for _ in range(args.warmup):
      jax.block_until_ready(step())
  rounds = [[] for _ in steps]
  for r in range(args.rounds):
    times = [[] for _ in steps]
    order = list(range(len(steps)))
    order = order[r % len(order):] + order[:r % len(order)]
    for _ in range(args.steps):
      for i in order:
        start = time.perf_counter()
        jax.block_until_ready(steps[i]())
        times[i].append(time.perf_counter() - start)
    for model_rounds, step_times in zip(rounds, times):
      model_rounds.append(statistics.median(step_times))
  return rounds


def inference_step(model: nnx.Module, ids_BxT: jax.Array) -> Callable[[], jax.Array]:
  """One jitted forward, eval mode -> logits [B, T, V]."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, ids_BxT):
    logits_BxTxV, _ = nnx.merge(graphdef, state)(ids_BxT)
    return logits_BxTxV

  return lambda: forward(state, ids_BxT)


def train_step(model: nnx.Module, ids_BxT: jax.Array, seed: int) -> Callable[[], jax.Array]:
  """One jitted next-token CE value_and_grad + AdamW update (state donated) -> the loss.
  Consumes the model's arrays."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(1e-4, weight_decay=0.01)
  carry = [params, rest, tx.init(params), jax.random.key(seed)]

  def loss_fn(params, rest, ids_BxT, key):
    m = nnx.merge(graphdef, params, rest, copy=True)
    h_BxTxD, _ = m.hidden(ids_BxT, rngs=nnx.Rngs(dropout=key))
    logits_BxTxV = m.logits(h_BxTxD[:, :-1])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, ids_BxT[:, 1:])
    return loss.mean(), nnx.state(m, nnx.Not(nnx.Param))

  def step(params, rest, opt_state, key, ids_BxT):
    key, sub = jax.random.split(key)
    (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, ids_BxT, sub)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state, key, loss

  step = jax.jit(step, donate_argnums=(0, 1, 2, 3))

  def run():
    *new, loss = step(*carry, ids_BxT)
    carry[:] = new
    return loss

  return run


def generation_step(model: nnx.Module, prompts: list[list[int]], new_tokens: int
                    ) -> Callable[[], object]:
  return lambda: generate(model, prompts, max_new_tokens=new_tokens)


def measurement(name: str, shape: str, tokens: int, rounds: list[list[float]]) -> dict:
  """One row: each model's seconds per round, tokens/s of the median, the per-round ratio."""
  ratios = [dense / resm for dense, resm in zip(*rounds)]
  row = dict(measure=name, shape=shape, tokens_per_step=tokens, ratio=statistics.median(ratios),
             ratio_rounds=ratios, ratio_min=min(ratios), ratio_max=max(ratios),
             target=TARGETS.get(name.split(",")[0]), models={})
  for (model, _), seconds in zip(MODELS, rounds):
    row["models"][model] = dict(seconds_rounds=seconds, median_s=statistics.median(seconds),
                                tokens_per_s=tokens / statistics.median(seconds))
  return row


def markdown_table(rows: list[dict]) -> str:
  lines = ["| measure | shape | GPT-2 tokens/s | +ResM tokens/s | +ResM / GPT-2 (median) "
           "| range over rounds | target |", "|---|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    target = "-" if r["target"] is None else f">= {r['target']:.2f}"
    lines.append(f"| {r['measure']} | {r['shape']} "
                 + "".join(f"| {r['models'][m]['tokens_per_s']:.1f} " for m, _ in MODELS)
                 + f"| {r['ratio']:.3f} | {r['ratio_min']:.3f}-{r['ratio_max']:.3f} "
                 f"| {target} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
  args = parse_args(argv)
  rng = np.random.default_rng(args.seed)
  models = [build_lm(model_config(args, mode), rngs=nnx.Rngs(args.seed)) for _, mode in MODELS]
  counts = [dict(model=name, params=count_params(m), memory_params=count_memory_params(m))
            for (name, _), m in zip(MODELS, models)]
  for c in counts:
    print(f"{c['model']}: {c['params'] / 1e6:.1f}M params ({c['memory_params'] / 1e6:.1f}M in "
          "memory)", flush=True)
  b, t = args.batch, args.seq
  ids_BxT = jnp.asarray(rng.integers(0, args.vocab, (b, t)), jnp.int32)
  rows = [measurement("inference", f"{b} x {t}", b * t,
                      timed_rounds([inference_step(m, ids_BxT) for m in models], args))]
  print(f"inference: ratio {rows[-1]['ratio']:.3f}", flush=True)
  for gb in (1, args.gen_batch) if args.gen_batch != 1 else (1,):
    prompts = rng.integers(0, args.vocab, (gb, args.prompt)).tolist()
    steps = [generation_step(m, prompts, args.new_tokens) for m in models]
    rows.append(measurement(f"generation, batch {gb}",
                            f"{gb} x ({args.prompt} + {args.new_tokens})",
                            gb * args.new_tokens, timed_rounds(steps, args)))
    print(f"generation batch {gb}: ratio {rows[-1]['ratio']:.3f}", flush=True)
  if not args.skip_train:
    steps = [train_step(models.pop(0), ids_BxT, args.seed) for _ in MODELS]  # donates params
    rows.append(measurement("training", f"{b} x {t}", b * t, timed_rounds(steps, args)))
    print(f"training: ratio {rows[-1]['ratio']:.3f}", flush=True)
    del steps

  table = markdown_table(rows)
  print(f"\n{jax.devices()[0].device_kind} x{jax.device_count()}, float32, memory layers "
        f"{list(args.memory_layers)} ({args.n_keys}² slots, {args.mem_heads} heads, k={args.k}), "
        f"{args.rounds} rounds x {args.steps} steps\n\n{table}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
  out.write_text(json.dumps(dict(
      settings=settings, device=jax.devices()[0].device_kind, device_count=jax.device_count(),
      jax_version=jax.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
      models=counts, results=rows,
      model_config=dataclasses.asdict(model_config(args, "residual"))), indent=2) + "\n")
  print(f"\nwrote {out}")
  return rows


if __name__ == "__main__":
  host_memory.reexec_with_huge_pages()  # as train.py does (pkm_jax/cli.py)
  main()
