"""Throughput of one BERT without memory, with PKM (FFN replaced) and with ResM (memory beside FFN),
and of the later memory kinds in the ResM placement: Memory+ (SiLU gate, one value table shared
by the memory layers) and PEER (a down and an up table of single-neuron experts).

The paper's speed table (Kim & Jung 2020, BERT-base, inference batch/s): base 79.8, +PKM 61.4
(0.77x), +ResM 59.3 (0.74x). This measures the same three variants of one model, in sequences/s:
  inference  jitted encoder forward in eval mode (what fine-tuning and feature extraction run),
             the three models timed round-robin so that their ratios survive a shared machine;
  training   jitted value_and_grad of the MLM loss + optax AdamW on every parameter (the value
             table too, densely, as the paper's Adam did), params and optimizer state donated.
             Logits are taken at round(0.15 * seq) positions per sequence, as BERT pretraining
             does, so the vocabulary projection does not swamp the encoder.
  --values_optimizer sparse_adam (or adam) adds a column: pkm-jax's own train step (the one
             `train.py` runs: pkm_jax.trainer's program, gradient clipping, logits at the masked
             positions of a batch masked as in pretraining) with that value-table optimizer;
             sparse_adam updates only the picked rows. Each model's step runs in a fresh
             process, round-robin with BERT's, and its ratio is to BERT's in that process.
Each number is the median over --steps timed steps after --warmup untimed ones (compilation),
each step ended with block_until_ready. Token batches are random: speed does not depend on them.

  python benchmarks/throughput.py --hidden 256 --layers 4 --heads 4 --intermediate 1024 \
      --n_keys 256 --batch 16 --seq 128          # a minute or two on a CPU
  python benchmarks/throughput.py                 # BERT-base sizes, the paper's memory
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
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
from configs import default as default_config  # noqa: E402
from pkm_jax import config as config_lib  # noqa: E402
from pkm_jax import config_checks  # noqa: E402
from pkm_jax import host_memory  # noqa: E402
from pkm_jax import trainer  # noqa: E402
from pkm_jax.architecture import MemoryConfig, ModelConfig  # noqa: E402
from pkm_jax.models.bert import BertForMaskedLM  # noqa: E402
from pkm_jax.data.mlm import mask_tokens  # noqa: E402
from pkm_jax.placement import MemoryPlacement  # noqa: E402

# (row name, memory mode, memory kind fields: pkm_jax/memory_kinds.py)
MODES = (("BERT", "none", {}), ("+PKM", "replace", {}), ("+ResM", "residual", {}),
         ("+ResM Memory+ shared", "residual",
          dict(kind="memory_plus", gate="silu", share_values=True)),
         ("+ResM PEER", "residual", dict(kind="peer")))
PAPER_INFERENCE_RATIO = {"BERT": 1.0, "+PKM": 61.4 / 79.8, "+ResM": 59.3 / 79.8}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--hidden", type=int, default=768)
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--intermediate", type=int, default=3072)
  p.add_argument("--vocab", type=int, default=30522)
  p.add_argument("--n_keys", type=int, default=512)
  p.add_argument("--mem_heads", type=int, default=4)
  p.add_argument("--k", type=int, default=32)
  p.add_argument("--k_dim", type=int, default=256)
  p.add_argument("--memory_layers", default="",
                 help="comma-separated 0-based indices; default: the paper's 4th and 8th of 12, "
                      "scaled to --layers")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="compute dtype; parameters stay float32")
  p.add_argument("--value_dtype", choices=("float32", "bfloat16"), default="float32",
                 help="memory value table storage (memory.value_dtype); Adam keeps its moments "
                      "in the same dtype")
  p.add_argument("--lookup_kernel", choices=config_checks.LOOKUP_KERNELS, default="xla",
                 help="the memory lookup's forward: pure JAX, or the Pallas kernel of this "
                      "platform (pkm_jax/lookup_kernels.py; interpret mode on CPU)")
  p.add_argument("--values_optimizer", choices=("", "adam", "sparse_adam"), default="",
                 help="also time pkm-jax's own train step with this optim.values_optimizer")
  p.add_argument("--models", default=",".join(m[0] for m in MODES),
                 help="comma-separated row names to measure, of: " + ", ".join(m[0] for m in MODES))
  p.add_argument("--skip_train", action="store_true",
                 help="inference only (train columns NaN): more timed steps in the same time")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" /
                                      "throughput.json"))
  args = p.parse_args(argv)
  if args.memory_layers:
    args.memory_layers = tuple(int(i) for i in args.memory_layers.split(","))
  else:
    args.memory_layers = tuple(sorted({max(0, round(args.layers / 3) - 1),
                                       max(0, round(2 * args.layers / 3) - 1)}))
  if len(set(args.memory_layers)) != len(args.memory_layers):
    p.error(f"--memory_layers {args.memory_layers} has duplicates")
  if any(not 0 <= i < args.layers for i in args.memory_layers):
    p.error(f"--memory_layers {args.memory_layers} out of range for --layers {args.layers}")
  if args.k > args.n_keys:
    p.error(f"--k {args.k} exceeds --n_keys {args.n_keys}")
  args.models = tuple(args.models.split(","))
  if unknown := set(args.models) - {m[0] for m in MODES}:
    p.error(f"--models: unknown {sorted(unknown)}")
  if args.steps < 1 or args.warmup < 0:
    p.error("--steps must be >= 1 and --warmup >= 0")
  return args


def model_config(args: argparse.Namespace, mode: str, kind: dict | None = None) -> ModelConfig:
  return ModelConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
      num_heads=args.heads, intermediate_size=args.intermediate,
      max_position_embeddings=max(512, args.seq), memory_mode=mode,
      memory_layers=args.memory_layers if mode != "none" else (),
      memory=MemoryConfig(n_keys=args.n_keys, heads=args.mem_heads, k=args.k,
                          k_dim=args.k_dim, v_dim=args.hidden, value_dtype=args.value_dtype,
                          **(kind or {})),
      dtype=args.dtype)


def random_batch(args: argparse.Namespace) -> dict[str, jax.Array]:
  rng = np.random.default_rng(args.seed)
  b, t = args.batch, args.seq
  n_pred = max(1, round(0.15 * t))
  # Distinct prediction positions per sequence, as MLM masking gives.
  positions = np.argsort(rng.random((b, t)), axis=1)[:, :n_pred]
  return dict(
      input_ids=jnp.asarray(rng.integers(0, args.vocab, (b, t)), jnp.int32),
      attention_mask=jnp.ones((b, t), jnp.int32),
      positions=jnp.asarray(np.sort(positions, axis=1), jnp.int32),
      labels=jnp.asarray(rng.integers(0, args.vocab, (b, n_pred)), jnp.int32))


def median_seconds(step: Callable[[], object], warmup: int, steps: int) -> float:
  for _ in range(warmup):
    jax.block_until_ready(step())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(step())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def inference_step(model: BertForMaskedLM, batch: dict) -> Callable[[], jax.Array]:
  """One jitted encoder forward of `batch` in eval mode -> h [B, T, D]."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, input_ids_BxT, mask_BxT):
    h_BxTxD, _ = nnx.merge(graphdef, state).bert(input_ids_BxT, mask_BxT)  # eval: no rngs
    return h_BxTxD

  return lambda: forward(state, batch["input_ids"], batch["attention_mask"])


def interleaved_median_seconds(steps: list[Callable[[], object]], warmup: int, n: int
                               ) -> list[float]:
  """The median time of each step, the steps run round-robin: a change in the load of a shared
  machine during the run then slows every model alike, and their ratios hold."""
  for step in steps:
    for _ in range(warmup):
      jax.block_until_ready(step())
  times = [[] for _ in steps]
  for _ in range(n):
    for step, step_times in zip(steps, times):
      start = time.perf_counter()
      jax.block_until_ready(step())
      step_times.append(time.perf_counter() - start)
  return [statistics.median(t) for t in times]


def train_seconds(model: BertForMaskedLM, batch: dict, args: argparse.Namespace) -> float:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # rest: batchnorm statistics
  tx = optax.adamw(1e-4, weight_decay=0.01)
  opt_state = tx.init(params)

  def loss_fn(params, rest, batch, key):
    m = nnx.merge(graphdef, params, rest, copy=True)  # fresh Variables in this trace
    h_BxTxD, _ = m.bert(batch["input_ids"], batch["attention_mask"],
                        rngs=nnx.Rngs(dropout=key))
    h_BxPxD = jnp.take_along_axis(h_BxTxD, batch["positions"][..., None], axis=1)
    logits_BxPxV = m.mlm_head(h_BxPxD, m.bert.embeddings.word_embeddings)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits_BxPxV, batch["labels"])
    return loss.mean(), nnx.state(m, nnx.Not(nnx.Param))

  def step(params, rest, opt_state, batch, key):
    (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, batch, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state, loss

  step = jax.jit(step, donate_argnums=(0, 1, 2))
  carry = [params, rest, opt_state]
  keys = iter(jax.random.split(jax.random.key(args.seed), args.warmup + args.steps))

  def run():
    carry[0], carry[1], carry[2], loss = step(*carry, batch, next(keys))
    return loss

  return median_seconds(run, args.warmup, args.steps)


def _program_step(args: argparse.Namespace, mode: str, kind: dict) -> Callable[[], jax.Array]:
  """One call of the train step `train.py` runs, built from configs/default.py resized to these
  args, one device, `--values_optimizer` for the value tables (its state carried, donated)."""
  config = default_config.get_config()
  config.model.update(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                      intermediate_size=args.intermediate,
                      max_position_embeddings=max(512, args.seq), dtype=args.dtype)
  config.memory.update(mode=mode, layers=args.memory_layers, n_keys=args.n_keys,
                       heads=args.mem_heads, k=args.k, k_dim=args.k_dim, v_dim=args.hidden,
                       value_dtype=args.value_dtype, **kind)
  config.data.update(batch_size=args.batch, max_len=args.seq, vocab_size=args.vocab)
  config.optim.values_optimizer = args.values_optimizer
  config.train.memory_stats_every = 0
  config.mesh.update(data=1, model=1, lookup_kernel=args.lookup_kernel)
  config_lib.validate(config, vocab_size=args.vocab)
  program = trainer.build_train_program(config, args.vocab)
  rng = np.random.default_rng(args.seed)
  b, t = args.batch, args.seq
  # Masked as pretraining masks (data.mlm): the step then scores only the masked positions.
  masked = mask_tokens(rng.integers(5, args.vocab, (b, t), dtype=np.int32), rng,
                       mask_prob=config.data.mask_prob, mask_id=4, special_ids=np.arange(5),
                       vocab_size=args.vocab)
  batch = program.to_device({**masked, "attention_mask": np.ones((b, t), np.int32),
                             "token_type_ids": np.zeros((b, t), np.int32)})
  with jax.set_mesh(program.mesh):
    carry = [program.init_state()]

  def run():
    with jax.set_mesh(program.mesh):
      carry[0], metrics, _ = program.train_step(carry[0], batch)
    return metrics["loss"]

  return run


def program_train_seconds(args: argparse.Namespace, mode: str, kind: dict
                          ) -> tuple[float, float]:
  """Median seconds of the `train.py` step of BERT and of this model (mode, kind), the two
  timed round-robin in this process: a shared machine's swings then slow both alike, and their
  ratio holds (BERT alone for mode 'none': the same time twice)."""
  steps = [_program_step(args, "none", {})]
  if mode != "none":
    steps.append(_program_step(args, mode, kind))
  times = interleaved_median_seconds(steps, args.warmup, args.steps)
  return times[0], times[-1]


def count_params(model: nnx.Module) -> int:
  return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def count_memory_params(model: nnx.Module) -> int:
  """Parameters of the memory layers and of the tables they share (path contains 'memory')."""
  flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  return sum(math.prod(x.shape) for path, x in flat if "memory" in jax.tree_util.keystr(path))


def markdown_table(results: list[dict]) -> str:
  program = "program_train_seq_per_s" in results[0]
  rows = ["| model | params | memory params | inference seq/s | train seq/s | inference ratio "
          "| train ratio |" + (" train.py step seq/s | ratio |" if program else "")
          + " paper inference ratio |",
          "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if program else "") + "---:|"]
  base = results[0]
  for r in results:
    paper = PAPER_INFERENCE_RATIO.get(r["model"])
    rows.append(
        f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['memory_params'] / 1e6:.2f}M "
        f"| {r['inference_seq_per_s']:.1f} "
        f"| {r['train_seq_per_s']:.1f} "
        f"| {r['inference_seq_per_s'] / base['inference_seq_per_s']:.3f} "
        f"| {r['train_seq_per_s'] / base['train_seq_per_s']:.3f} "
        + (f"| {r['program_train_seq_per_s']:.2f} | {r['program_train_ratio']:.3f} "
           if program else "")
        + f"| {'-' if paper is None else f'{paper:.3f}'} |")
  return "\n".join(rows)


def main(argv: list[str] | None = None) -> list[dict]:
  args = parse_args(argv)
  batch = random_batch(args)
  modes = [m for m in MODES if m[0] in args.models]
  placement = MemoryPlacement(lookup_kernel=args.lookup_kernel)
  models = [BertForMaskedLM(model_config(args, mode, kind), rngs=nnx.Rngs(args.seed),
                            placement=placement)
            for _, mode, kind in modes]
  infer = interleaved_median_seconds([inference_step(m, batch) for m in models], args.warmup,
                                     args.steps)
  results = []
  for (name, mode, kind), infer_s in zip(modes, infer):
    model = models.pop(0)
    params, memory_params = count_params(model), count_memory_params(model)
    # One model at a time (several optimizer states would not fit); donates the model's arrays.
    train_s = math.nan if args.skip_train else train_seconds(model, batch, args)
    del model
    results.append(dict(model=name, mode=mode, kind=kind, params=params,
                        memory_params=memory_params,
                        inference_step_s=infer_s, train_step_s=train_s,
                        inference_seq_per_s=args.batch / infer_s,
                        train_seq_per_s=args.batch / train_s))
    line = (f"{name}: {params / 1e6:.1f}M params, inference {infer_s * 1e3:.1f} ms/step, "
            f"train {train_s * 1e3:.1f} ms/step")
    if args.values_optimizer:
      # Each model in a fresh process, with BERT beside it (timed round-robin): no timing
      # carries what an earlier model left in memory, and the ratio is the two's in one process.
      with multiprocessing.get_context("spawn").Pool(1) as pool:
        bert_s, step_s = pool.apply(program_train_seconds, (args, mode, kind))
      results[-1].update(program_train_step_s=step_s, program_train_seq_per_s=args.batch / step_s,
                         program_bert_step_s=bert_s, program_train_ratio=bert_s / step_s)
      line += (f", train.py step ({args.values_optimizer}) {step_s * 1e3:.1f} ms (BERT beside "
               f"it {bert_s * 1e3:.1f} ms)")
    print(line, flush=True)

  table = markdown_table(results)
  print(f"\n{jax.devices()[0].device_kind} x{jax.device_count()}, batch {args.batch} x seq "
        f"{args.seq}, {args.dtype}, value table {args.value_dtype}, lookup "
        f"{args.lookup_kernel}, memory layers "
        f"{list(args.memory_layers)}\n\n{table}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
  out.write_text(json.dumps(dict(
      settings=settings, device=jax.devices()[0].device_kind, device_count=jax.device_count(),
      jax_version=jax.__version__, results=results,
      model_config=dataclasses.asdict(model_config(args, "residual"))), indent=2) + "\n")
  print(f"\nwrote {out}")
  return results


if __name__ == "__main__":
  host_memory.reexec_with_huge_pages()  # as train.py does (pkm_jax/cli.py)
  main()
