"""Data at scale: preparation throughput, training start-up and peak memory, loader throughput.

For each text size (default ~10 MB, ~100 MB, ~1 GB), generated into a temporary folder that is
removed afterwards:
- preparation: `pkm_jax.data.prepare.prepare` (what `python -m pkm_jax.data.prepare` runs) with
  every core, max_len 128, a WordPiece vocabulary of 8,000 learnt once from the first ~4 MB;
  MB/s = input bytes / wall time;
- start-up: a fresh `python` process trains a tiny model (hidden 64, 2 layers, one ResM layer,
  batch 32 x 128) on the prepared folder with the trainer itself: seconds from the process'
  launch to the first batch in hand and to the end of the first step (JAX start, restore or
  init, compilation included: the same at every size), and the process' peak resident memory
  (ru_maxrss), each from its own process; --rounds runs per size, interleaved, the fastest kept;
- loader: sequences/s of batches of 256 x 128 with MLM masking (no model), from another fresh
  process, with grain's threads (data.workers=0, prefetch 2) and with 2 worker processes;
  --rounds runs per size, interleaved, the fastest kept.
For reference the in-memory `data.source=files` start-up is measured at the smallest size.
Text: the generated world corpus (pkm_jax.data.corpus), four seeds cycled to reach the size; its
vocabulary is small, so the encoder's word memory (encoder.py) hits more often than on natural
text. Growth is reported as the ratio of the largest size to the smallest, within one run.

  python benchmarks/data_scale.py                       # ~15 minutes on 2 CPU cores
  python benchmarks/data_scale.py --sizes_mb 5,20       # quicker
Writes benchmarks/results/data_scale.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script
TARGETS = {"startup_ratio": 1.2, "rss_ratio": 1.2, "loader_seq_per_s": 5000, "prepare_mb_s": 5}
FILE_MB = 64  # the generated text is split into files of about this size
TINY_MODEL = {
    "model.hidden_size": 64, "model.num_layers": 2, "model.num_heads": 2,
    "model.intermediate_size": 128, "model.max_position_embeddings": 128,
    "memory.layers": (1,), "memory.n_keys": 32, "memory.heads": 2, "memory.k": 8,
    "memory.k_dim": 32, "data.max_len": 128, "data.batch_size": 32, "train.steps": 2,
    "train.log_every": 2, "train.eval_every": 2, "train.checkpoint_every": 2,
    "train.eval_batches": 1, "train.memory_stats_every": 0, "optim.warmup_steps": 1,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes_mb", default="10,100,1000", help="comma-separated text sizes (MB)")
  p.add_argument("--loader_batches", type=int, default=200, help="timed loader batches")
  p.add_argument("--rounds", type=int, default=2,
                 help="start-up and loader runs per size, interleaved")
  p.add_argument("--tmp", default="", help="where the temporary folder goes (default: $TMPDIR)")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_scale.json"))
  p.add_argument("--child", default="", help=argparse.SUPPRESS)  # 'startup' | 'loader'
  p.add_argument("--child_args", default="{}", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.sizes_mb = [float(s) for s in args.sizes_mb.split(",")]
  return args


# --- Children: each measurement in a fresh process ------------------------------------------


def child_startup(opts: dict) -> dict:
  """Trains 2 steps; times the first batch and the end of the first step from `launch`."""
  from configs import default  # pylint: disable=g-import-not-at-top  # fresh process: timed
  from pkm_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from pkm_jax import trainer  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  for key, value in {**TINY_MODEL, **opts["overrides"]}.items():
    group, name = key.rsplit(".", 1)
    node = config
    for part in group.split("."):
      node = node[part]
    node[name] = value
  calls: list[float] = []
  make_mlm_data = data_lib.make_mlm_data

  def timed_make_mlm_data(*a, **k):
    # The trainer asks for batch n+1 after step n has finished (it blocks on step 0's result,
    # which includes compilation), so the second request marks the end of the first step.
    train_iter, eval_data = make_mlm_data(*a, **k)
    first_next = train_iter.__next__

    class Timed:
      def __getattr__(self, name):
        return getattr(train_iter, name)

      def __next__(self):
        calls.append(time.time())
        batch = first_next()
        calls.append(time.time())
        return batch

      def __iter__(self):
        return self

    return Timed(), eval_data

  data_lib.make_mlm_data = timed_make_mlm_data  # timing only: the real function does the work
  trainer.train_and_evaluate(config, opts["workdir"])
  return {"first_batch_s": calls[1] - opts["launch"], "first_step_s": calls[2] - opts["launch"],
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child_loader(opts: dict) -> dict:
  """Sequences/s of masked batches straight from the loader (no model)."""
  from pkm_jax.config import base_config  # pylint: disable=g-import-not-at-top
  from pkm_jax.data import load_tokenizer, make_mlm_data  # pylint: disable=g-import-not-at-top
  cfg = base_config().data
  cfg.update(source="prepared", path=opts["path"], batch_size=256, max_len=128,
             workers=opts["workers"], prefetch=2)
  train_iter, _ = make_mlm_data(cfg, load_tokenizer(opts["path"]), seed=0)
  for _ in range(5):  # start-up: threads or worker processes, first readers opened
    next(train_iter)
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(opts["batches"]):
    next(train_iter)
  seconds = time.perf_counter() - start
  train_iter.close()
  return {"seq_per_s": opts["batches"] * 256 / seconds,
          "cpu_s_per_1k_seq": (time.process_time() - cpu) / (opts["batches"] * 256) * 1000}


def run_child(kind: str, opts: dict) -> dict:
  opts = {**opts, "launch": time.time()}
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  done = subprocess.run([sys.executable, __file__, f"--child={kind}",
                         f"--child_args={json.dumps(opts)}"], cwd=ROOT, env=env,
                        capture_output=True, text=True)
  if done.returncode:
    raise RuntimeError(f"{kind} child failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


# --- Parent -----------------------------------------------------------------------------------


def _cpu_seconds() -> float:
  """User + system CPU time of this process and of its children that have ended."""
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
      resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def write_text(folder: pathlib.Path, size_mb: float, pool: list[str]) -> int:
  """Files of ~FILE_MB of documents (blank lines between them), cycling `pool`; bytes written."""
  folder.mkdir(parents=True)
  target, written, chunks = int(size_mb * 1e6), 0, 0
  while written < target:
    with open(folder / f"part{written // int(FILE_MB * 1e6):04d}.txt", "w",
              encoding="utf-8") as f:
      in_file = 0
      while in_file < FILE_MB * 1e6 and written + in_file < target:
        chunk = pool[chunks % len(pool)]
        chunks += 1
        f.write(chunk)
        in_file += len(chunk.encode("utf-8"))
    written += in_file
  return written


def text_pool(seeds: int = 4) -> list[str]:
  """~1 MB chunks of generated documents (four corpora of ~5 MB)."""
  from pkm_jax.data.corpus import generate_corpus  # pylint: disable=g-import-not-at-top
  chunks = []
  for seed in range(seeds):
    docs = generate_corpus(2000, 20000, seed).train
    text = "\n\n".join("\n".join(doc) for doc in docs) + "\n\n"
    step = len(text) // 5
    chunks += [text[i * step:(i + 1) * step] for i in range(5)]
  # Cut at document boundaries: each chunk ends with a blank line.
  return [c[:c.rfind("\n\n") + 2] for c in chunks]


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  if args.child:
    print(json.dumps({"startup": child_startup, "loader": child_loader}[args.child](
        json.loads(args.child_args))))
    return
  from pkm_jax.data import prepare as prepare_lib  # pylint: disable=g-import-not-at-top
  from pkm_jax.data import text_stream  # pylint: disable=g-import-not-at-top
  from pkm_jax.data.sources import expand_files  # pylint: disable=g-import-not-at-top
  from pkm_jax.data.tokenizer import save_tokenizer, train_tokenizer  # pylint: disable=g-import-not-at-top

  tmp = pathlib.Path(tempfile.mkdtemp(prefix="pkm_data_scale_", dir=args.tmp or None))
  rows, extra = [], {}
  try:
    pool = text_pool()
    sample = tmp / "sample"
    write_text(sample, 4, pool)
    start = time.perf_counter()
    tok = train_tokenizer(lambda: text_stream.sentences_of(text_stream.file_blocks(
        expand_files(str(sample / "*.txt")))), 8000)
    extra["wordpiece_training_mb_s"] = 4 / (time.perf_counter() - start)
    save_tokenizer(tok, str(tmp / "tokenizer.json"))
    folders = {}
    for size in args.sizes_mb:  # prepare every size first (the text is removed at once)
      text, out = tmp / f"text_{size:g}", tmp / f"prepared_{size:g}"
      nbytes = write_text(text, size, pool)
      start, cpu = time.perf_counter(), _cpu_seconds()
      meta = prepare_lib.prepare(str(out), inputs=str(text / "*.txt"),
                                 tokenizer=str(tmp / "tokenizer.json"), max_len=128,
                                 eval_fraction=0.002, progress=False)
      rows.append({"size_mb": nbytes / 1e6,
                   "prepare_mb_s": nbytes / 1e6 / (time.perf_counter() - start),
                   # This process and its (reaped) tokenising workers: what a shared machine's
                   # load does not inflate as much as wall time.
                   "prepare_cpu_s_per_mb": (_cpu_seconds() - cpu) / (nbytes / 1e6),
                   "rows": meta["splits"]["train"]["rows"],
                   "shards": len(meta["splits"]["train"]["shards"])})
      print(json.dumps(rows[-1]), flush=True)
      if size == args.sizes_mb[0]:  # the in-memory source, for reference
        extra["files_source_startup"] = run_child("startup", {
            "workdir": str(tmp / "run_files"),
            "overrides": {"data.source": "files", "data.files": str(text / "*.txt"),
                          "data.tokenizer": str(tmp / "tokenizer.json")}})
      shutil.rmtree(text)
      folders[size] = out
    # Start-up and loader, interleaved over sizes for --rounds rounds (a slow spell of a shared
    # machine hits every size alike); the fastest round of each size is kept.
    for r in range(args.rounds):
      for row, size in zip(rows, args.sizes_mb):
        got = run_child("startup", {"workdir": str(tmp / f"run_{size:g}_{r}"), "overrides": {
            "data.source": "prepared", "data.path": str(folders[size])}})
        row.setdefault("startup_rounds", []).append(got)
        for workers in (0, 2):
          row.setdefault(f"loader_w{workers}_rounds", []).append(run_child(
              "loader", {"path": str(folders[size]), "workers": workers,
                         "batches": args.loader_batches}))
    for row in rows:
      row.update(min(row["startup_rounds"], key=lambda g: g["first_step_s"]))
      row["peak_rss_mb"] = min(g["peak_rss_mb"] for g in row["startup_rounds"])
      for workers in (0, 2):
        row[f"loader_w{workers}"] = max(row[f"loader_w{workers}_rounds"],
                                        key=lambda g: g["seq_per_s"])
      print(json.dumps(row), flush=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)

  first, last = rows[0], rows[-1]
  summary = {
      "startup_ratio": last["first_step_s"] / first["first_step_s"],
      "rss_ratio": last["peak_rss_mb"] / first["peak_rss_mb"],
      "loader_seq_per_s": min(r["loader_w0"]["seq_per_s"] for r in rows),
      "prepare_mb_s": min(r["prepare_mb_s"] for r in rows),
  }
  met = {k: (v <= TARGETS[k] if k.endswith("ratio") else v >= TARGETS[k])
         for k, v in summary.items()}
  result = {"rows": rows, "summary": summary, "targets": TARGETS, "met": met, **extra,
            "cpus": os.cpu_count(), "load_average": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d")}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"\nLoad average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
  print("\n| text | prepare (CPU s/MB) | rows (shards) | first batch | first step | peak RSS "
        "| loader (threads) | loader (2 workers) |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['size_mb']:,.0f} MB | {r['prepare_mb_s']:.1f} MB/s "
          f"({r['prepare_cpu_s_per_mb']:.2f}) | {r['rows']:,} "
          f"({r['shards']}) | {r['first_batch_s']:.1f} s | {r['first_step_s']:.1f} s | "
          f"{r['peak_rss_mb']:,.0f} MiB | {r['loader_w0']['seq_per_s']:,.0f} seq/s | "
          f"{r['loader_w2']['seq_per_s']:,.0f} seq/s |")
  files = extra["files_source_startup"]
  print(f"\ndata.source=files (in memory) at {rows[0]['size_mb']:.0f} MB: first step "
        f"{files['first_step_s']:.1f} s, peak RSS {files['peak_rss_mb']:,.0f} MiB. "
        f"WordPiece training (streamed): {extra['wordpiece_training_mb_s']:.2f} MB/s.")
  print("Growth, largest / smallest: start-up {startup_ratio:.2f}x, peak RSS {rss_ratio:.2f}x; "
        "slowest loader {loader_seq_per_s:,.0f} seq/s; slowest preparation "
        "{prepare_mb_s:.1f} MB/s".format(**summary))
  print("Targets met: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in met.items()))


if __name__ == "__main__":
  main()
