"""Pod plan: what the real train step and inference forward do on each device of a pod, compiled
ahead of time from abstract shapes (nothing allocated), without an accelerator.

Each row is (model config, layout, target). `pkm_jax/deviceless.py` compiles train.py's train
step and eval forward for the row's config on the target's devices ('v5e:2x4', 'v4:2x2x2', ...:
XLA:TPU deviceless; 'h100:8': XLA:GPU through jax's CUDA plugin without a GPU; 'cpu:8': host CPU
devices), one child process per target (this process is never reconfigured). Per device, from
XLA itself (`pkm_jax/compiled_stats.py`): FLOPs and bytes accessed (`cost_analysis()`),
collective bytes by kind (from the optimized HLO, times loop trip counts), peak memory
(`memory_analysis()`: arguments + temporaries + outputs - aliased), while-loop iterations, sorts
and conditionals; and the value-table bytes each device holds. The ideal is the one-device
program's figure / n (compiled for one device of the same target; a one-device program too big
for a TPU chip's memory does not compile there, and the host CPU's one-device program stands in,
marked `cpu`).

Roofline time per device = max(FLOPs / peak, bytes accessed / HBM bandwidth, collective bytes /
interconnect bandwidth), for each chip below (bf16 dense peaks, per chip; interconnect one way);
the ResM/dense ratio is the dense row's roofline time over the ResM row's (a throughput ratio):
  H100 SXM: 989 TFLOP/s, 3.35 TB/s HBM3, NVLink 450 GB/s (NVIDIA H100 Tensor Core GPU datasheet:
            900 GB/s both ways)
  TPU v4:   275 TFLOP/s, 1.2 TB/s HBM2, ICI 268 GB/s (cloud.google.com/tpu/docs/v4: all-reduce
            bandwidth 1.1 PB/s per 4096-chip pod)
  TPU v5e:  197 TFLOP/s, 819 GB/s HBM2, ICI 200 GB/s (cloud.google.com/tpu/docs/v5e: 400 GB/s
            both ways)

  python benchmarks/pod_plan.py --quick         # tiny config, 8 host devices + v5e:2x4, ~3 min
  python benchmarks/pod_plan.py --single_chip   # BERT-base bf16, 64 x 128: dense vs +ResM, one
                                                # v5e chip (+ the Pallas lookup)
  python benchmarks/pod_plan.py --targets v5e:2x4,h100:8 --sizes base --kinds resm \
      --layouts batch_data,batch_all             # a choice of rows
  python benchmarks/pod_plan.py                 # every row: hours of compiles on 2 cores
XLA:TPU takes minutes per BERT-base program on one core (measured: ~5 CPU-minutes for the
single-chip train step + forward), so choose rows; each is a (target, size, kind, layout), and a
layout is a name in LAYOUTS -> config overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script

from pkm_jax import config as config_lib  # noqa: E402
from pkm_jax import deviceless  # noqa: E402
from pkm_jax.deviceless import family  # noqa: E402

# Which configs a row's model comes from: (size, kind) -> module under configs/.
MODELS = {
    ("base", "dense"): "bert_base", ("base", "pkm"): "bert_base_pkm",
    ("base", "resm"): "bert_base_resm",
    ("large", "dense"): "bert_large", ("large", "pkm"): "bert_large_pkm",
    ("large", "resm"): "bert_large_resm",
    ("pod", "resm"): "bert_large_resm_pod", ("pod", "dense"): "bert_large_resm_pod",
    ("tiny", "dense"): "default", ("tiny", "resm"): "default",
    # A Llama-style decoder (RMSNorm, RoPE, SwiGLU, GQA) under the same rules: no sharding code
    # of its own.
    ("llama", "dense"): "llama_resm", ("llama", "resm"): "llama_resm",
}
KIND_OVERRIDES = {"dense": {"memory.mode": "none"}, "pkm": {}, "resm": {}}
# The pod config's own kind is resm; its dense row keeps its layout and drops the memory.
ALWAYS = {"train.memory_stats_every": 0}

# A layout is config overrides. 'model' is the 'model' axis size (8, or n when fewer devices).
LAYOUTS: dict[str, dict[str, Any]] = {
    "shipped": {},  # the config as it is
    "data": {"mesh.data": -1, "mesh.model": 1, "mesh.rules": ()},  # tables replicated
    # The rules before 2026-12-07: the batch over 'data' only, rows over 'model'.
    "batch_data": {"mesh.data": -1, "mesh.model": 8, "mesh.rules": (("batch", "data"),),
                   "mesh.table_split": "rows"},
    "batch_all": {"mesh.data": -1, "mesh.model": 8,
                  "mesh.rules": (("batch", ("data", "model")),), "mesh.table_split": "rows"},
    "rows_all": {"mesh.data": -1, "mesh.model": 8,
                 "mesh.rules": (("batch", ("data", "model")), ("slots", ("model", "data")))},
    # mesh.table_split / mesh.fsdp (pkm_jax/sharding.py): the batch over every device, the
    # tables split over 'model' by columns or rows, and with fsdp the dense weights too.
    "columns": {"mesh.data": -1, "mesh.model": 8, "mesh.rules": (), "mesh.table_split": "columns"},
    "rows": {"mesh.data": -1, "mesh.model": 8, "mesh.rules": (), "mesh.table_split": "rows"},
    "columns_fsdp": {"mesh.data": -1, "mesh.model": 8, "mesh.rules": (),
                     "mesh.table_split": "columns", "mesh.fsdp": True},
}
ONE_DEVICE = {"mesh.data": 1, "mesh.model": 1, "mesh.rules": ()}

# Small sizes with the pod config's structure (tests, --quick): every dimension divides by 8.
TINY = {"model.hidden_size": 64, "model.num_layers": 2, "model.num_heads": 4,
        "model.intermediate_size": 256, "model.max_position_embeddings": 64,
        "data.vocab_size": 512, "data.max_len": 32, "data.batch_size": 64,
        "memory.layers": (1,), "memory.n_keys": 32, "memory.heads": 2, "memory.k": 4,
        "memory.k_dim": 32, "memory.v_dim": 64}

CHIPS = {  # peak bf16 FLOP/s, HBM bytes/s, interconnect bytes/s one way (sources: docstring)
    "H100": (989e12, 3.35e12, 450e9),
    "v4": (275e12, 1.2e12, 268e9),
    "v5e": (197e12, 819e9, 200e9),
}


@dataclasses.dataclass(frozen=True)
class Row:
  size: str  # base | large | pod | tiny | llama
  kind: str  # dense | pkm | resm
  layout: str
  target: str  # 'cpu', 'h100:N' or a TPU topology name, e.g. 'v5e:2x4'
  devices: int  # of the target's devices, the first `devices` (1: the ideal's program)
  overrides: tuple = ()  # extra (key, value) config overrides, e.g. TINY's
  programs: tuple = ("train", "infer")
  label: str = ""  # a name for rows with extra overrides

  @property
  def name(self) -> str:
    return f"{self.size}{'+' + self.kind if self.kind != 'dense' else ''}{self.label}"


def row_config(row: Row):
  """The validated config of a row: the model's config file, its kind, the layout, overrides."""
  config = importlib.import_module(f"configs.{MODELS[row.size, row.kind]}").get_config()
  layout = dict(LAYOUTS[row.layout]) if row.devices > 1 else dict(ONE_DEVICE)
  if layout.get("mesh.model", 1) > row.devices:
    layout["mesh.model"] = row.devices
  for key, value in {**ALWAYS, **KIND_OVERRIDES[row.kind], **dict(row.overrides),
                     **layout}.items():
    group, field = key.split(".")
    config[group][field] = value
  if config.memory.mode != "none" and max(config.memory.layers) >= config.model.num_layers:
    raise ValueError(f"{row}: memory layers past the model's {config.model.num_layers}")
  config_lib.validate(config, vocab_size=config.data.vocab_size)
  return config


def child_main(spec_path: str) -> None:
  """The child process (deviceless.run_children): compiles spec['rows'] for spec['target'],
  writes spec['out']."""
  spec = json.loads(pathlib.Path(spec_path).read_text())
  devices = deviceless.target_devices(spec["target"])
  results = []
  for fields in spec["rows"]:
    row = Row(**_tuples(fields))
    try:
      results.append(dict(row=fields, **deviceless.compile_programs(
          row_config(row), devices[:row.devices], row.programs)))
    except Exception as e:  # pylint: disable=broad-except
      results.append(dict(row=fields, error=f"{type(e).__name__}: {e}"[:2000]))
    seconds = sum(p.get("compile_s", 0) for p in results[-1].get("programs", {}).values())
    print(f"  {spec['target']} n={row.devices} {row.name} {row.layout}: "
          f"{results[-1].get('error', f'compiled in {seconds:.0f} s')[:300]}", flush=True)
    pathlib.Path(spec["out"]).write_text(json.dumps(results))  # after every row
  jax.clear_caches()


# The parent: plans rows, runs one child per target, joins the ideals, prints the tables.


def ideal_rows(rows: list[Row], one_device_target: dict[str, str], cpu_too: bool) -> list[Row]:
  """The one-device row of each (model, target family) the rows need, on the family's target in
  `one_device_target` (none: the CPU's stands in); and with `cpu_too` on the host CPU as well,
  for when a TPU chip's memory cannot hold the one-device program."""
  need = {}
  for r in rows:
    targets = {one_device_target.get(family(r.target), "cpu")} | ({"cpu"} if cpu_too else set())
    for target in targets:
      one = dataclasses.replace(r, layout="data", target=target, devices=1)
      need.setdefault((one.size, one.kind, one.overrides, one.label, target), one)
  return list(need.values())


def plan(args: argparse.Namespace) -> list[Row]:
  """The rows of this run, most telling first (a --budget_s cut drops the tail)."""
  if args.quick:
    tiny = tuple(TINY.items())
    rows = [Row("tiny", "dense", "batch_all", "cpu", 8, tiny)]
    rows += [Row("tiny", "resm", layout, "cpu", 8, tiny)
             for layout in ("batch_data", "batch_all", "rows_all")]
    # XLA:TPU compiles even tiny programs slowly (~30 s): two rows, their ideal the CPU's.
    rows += [Row("tiny", "resm", layout, "v5e:2x4", 8, tiny, ("train",))
             for layout in ("batch_data", "batch_all")]
    rows += [Row("pod", kind, "shipped", "cpu", 8, tiny) for kind in ("resm", "dense")]
    llama = tiny + (("model.num_kv_heads", 2),)
    return rows + [Row("llama", kind, "columns_fsdp", "cpu", 8, llama)
                   for kind in ("dense", "resm")]
  if args.single_chip:
    bf16 = (("model.dtype", "bfloat16"), ("memory.value_dtype", "bfloat16"),
            ("data.batch_size", 64), ("data.max_len", 128))
    pallas = bf16 + (("mesh.lookup_kernel", "pallas"),)
    f32_pallas = bf16[:1] + bf16[2:] + (("mesh.lookup_kernel", "pallas"),)
    return [Row("base", "dense", "data", "v5e:2x2", 1, bf16, label=" bf16"),
            Row("base", "resm", "data", "v5e:2x2", 1, bf16, label=" bf16"),
            Row("base", "resm", "data", "v5e:2x2", 1, pallas, label=" bf16 pallas"),
            Row("base", "resm", "data", "v5e:2x2", 1, f32_pallas, label=" f32-table pallas")]
  rows = []
  for target, n in args.targets:
    for size in args.sizes:
      if size == "pod":
        rows += [Row("pod", kind, "shipped", target, n, programs=args.programs)
                 for kind in ("dense", "resm") if kind in args.kinds]
        continue
      for kind in args.kinds:
        for layout in args.layouts:
          if kind == "dense" and layout == "rows_all":
            continue  # no table: the same program as batch_all
          rows.append(Row(size, kind, layout, target, n, programs=args.programs))
  return rows


def run_rows(rows: list[Row], jobs: int, timeout_s: float) -> list[dict]:
  """Compiles `rows`, one child per (target, device count), `jobs` at a time."""
  by_target: dict[tuple[str, int], list[dict]] = {}
  for r in rows:
    by_target.setdefault((r.target, r.devices), []).append(dataclasses.asdict(r))
  return deviceless.run_children(__file__, by_target, jobs, timeout_s)


def _key(row: dict) -> tuple:
  return (row["size"], row["kind"], json.dumps(row["overrides"]), row["label"])


def join(results: list[dict]) -> list[dict]:
  """Each multi-device row's programs with their ideal (the one-device program's figures / n,
  from the same target family, else the host CPU's) and roofline times."""
  ones = {(_key(r["row"]), family(r["row"]["target"])): r
          for r in results if r["row"]["devices"] == 1 and "error" not in r}
  out = []
  for r in results:
    row = r["row"]
    n = row["devices"]
    entry = dict(r)
    if "error" in r:
      out.append(entry)
      continue
    for name, prog in r["programs"].items():
      if "error" in prog:
        continue
      one = None
      for fam in (family(row["target"]), "cpu"):
        cand = ones.get((_key(row), fam))
        if cand and "error" not in cand["programs"].get(name, {"error": 1}):
          one = (fam, cand)
          break
      if one is not None:
        base = one[1]["programs"][name]
        prog["ideal"] = {k: None if base[k] is None else base[k] / n
                         for k in ("flops", "bytes_accessed", "peak_bytes")}
        prog["ideal"]["source"] = one[0]
      prog["collective_total"] = sum(prog["collective_bytes"].values())
      if prog["flops"] is not None:  # (XLA:GPU without a GPU has no cost analysis)
        prog["roofline_s"] = {chip: max(prog["flops"] / f, prog["bytes_accessed"] / b,
                                        prog["collective_total"] / link)
                              for chip, (f, b, link) in CHIPS.items()}
    entry["table_ideal_bytes"] = r["table_bytes"] / n
    out.append(entry)
  return out


def ratios(joined: list[dict]) -> list[dict]:
  """ResM (and PKM) / dense roofline throughput (dense time / memory model's time) per chip,
  for rows that have a dense twin (same size, layout, target and devices)."""
  ok = [r for r in joined if "error" not in r]
  out = []
  for r in ok:
    row = r["row"]
    if row["kind"] == "dense" or (row["devices"] == 1 and not row["label"]):
      continue  # (the ideals' one-device programs are not rows of the table)
    twins = [d for d in ok if d["row"]["kind"] == "dense" and all(
        d["row"][k] == row[k] for k in ("size", "layout", "target", "devices"))]
    twins.sort(key=lambda d: d["row"]["label"] != row["label"])
    if not twins:
      continue
    for name, prog in r["programs"].items():
      dense = twins[0]["programs"].get(name, {})
      if "roofline_s" in prog and "roofline_s" in dense:
        out.append(dict(row=row, dense_label=twins[0]["row"]["label"], program=name,
                        ratio={c: dense["roofline_s"][c] / prog["roofline_s"][c]
                               for c in CHIPS}))
  return out


def _x(value: float | None, ideal: float | None) -> str:
  return f"{value / ideal:.2f}" if ideal and value is not None else "-"


def _num(value: float | None, scale: float, fmt: str) -> str:
  return "-" if value is None else format(value / scale, fmt)


def markdown(joined: list[dict], ratio_rows: list[dict]) -> str:
  """The per-device table and the ratio table, as markdown."""
  head = ("| target | n | model | layout | program | GFLOP | x ideal | GB accessed | x ideal | "
          "collective MB AR/AG/RS/A2A/CP | peak GB | x ideal | table MB | x ideal | loop iters |"
          " sorts | conds | " + " | ".join(f"{c} ms" for c in CHIPS) + " |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in joined:
    row = r["row"]
    if row["devices"] == 1 and not row["label"]:
      continue  # the ideals' own programs
    where = f"| {row['target']} | {row['devices']} | {Row(**_tuples(row)).name} | {row['layout']}"
    if "error" in r:
      lines.append(f"{where} | - | failed: {r['error'][:120]} |")
      continue
    for name, p in r["programs"].items():
      if "error" in p:
        why = p["error"].replace("JaxRuntimeError: ", "").replace("the total memory ", "")
        lines.append(f"{where} | {name} | failed: {why[:160]} |")
        continue
      ideal = p.get("ideal", {})
      coll = "/".join(f"{v / 1e6:.0f}" for v in p["collective_bytes"].values())
      lines.append(
          f"{where} | {name} | {_num(p['flops'], 1e9, '.1f')} | "
          f"{_x(p['flops'], ideal.get('flops'))} | {_num(p['bytes_accessed'], 1e9, '.2f')} | "
          f"{_x(p['bytes_accessed'], ideal.get('bytes_accessed'))} | {coll} | "
          f"{p['peak_bytes'] / 1e9:.2f} | {_x(p['peak_bytes'], ideal.get('peak_bytes'))} | "
          f"{r['table_bytes_per_device'] / 1e6:.3g} | "
          f"{_x(r['table_bytes_per_device'], r['table_ideal_bytes'])} | "
          f"{p['loop_iterations']:.0f} | {p['sorts']:.0f} | {p['conditionals']:.0f} | "
          + " | ".join(f"{t * 1e3:.2f}" for t in p.get("roofline_s", {}).values()) + " |")
  if ratio_rows:
    lines += ["", "| target | n | model | layout | program | vs | "
              + " | ".join(f"{c} ratio" for c in CHIPS) + " |",
              "|" + "---|" * (6 + len(CHIPS))]
    for q in ratio_rows:
      row = q["row"]
      lines.append(f"| {row['target']} | {row['devices']} | {Row(**_tuples(row)).name} | "
                   f"{row['layout']} | {q['program']} | {row['size']}{q['dense_label']} | "
                   + " | ".join(f"{v:.2f}" for v in q["ratio"].values()) + " |")
  return "\n".join(lines)


def _tuples(row: dict) -> dict:
  return {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list)
          else v for k, v in row.items()}


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="tiny config, 8 host devices + v5e:2x4")
  p.add_argument("--single_chip", action="store_true",
                 help="BERT-base bf16, batch 64 x 128, dense vs +ResM on one v5e chip")
  p.add_argument("--targets", default="v5e:2x4,cpu:8,v5e:8x8,v5p:2x2x2,v4:2x2x2,cpu:64")
  p.add_argument("--sizes", default="pod,base,large")
  p.add_argument("--kinds", default="dense,resm,pkm")
  p.add_argument("--layouts", default="batch_data,batch_all,rows_all,data")
  p.add_argument("--cpu_ideal", action=argparse.BooleanOptionalAction, default=True,
                 help="also compile the one-device programs on the host CPU (the ideal where a "
                      "TPU chip's memory cannot hold them)")
  p.add_argument("--programs", default="train,infer", help="train and/or infer")
  p.add_argument("--jobs", type=int, default=2, help="children compiling at once")
  p.add_argument("--timeout_s", type=float, default=3600, help="per child")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pod_plan"))
  p.add_argument("--child", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    child_main(args.child)
    return {}
  try:
    args.targets = [deviceless.parse_target(t) for t in args.targets.split(",")]
  except ValueError:
    sys.exit(f"pod_plan: --targets={args.targets!r}: expected e.g. cpu:8,v5e:2x4,v4:2x2x2")
  args.sizes, args.kinds = args.sizes.split(","), args.kinds.split(",")
  args.layouts, args.programs = args.layouts.split(","), tuple(args.programs.split(","))
  if not set(args.programs) <= {"train", "infer"}:
    sys.exit(f"pod_plan: --programs={','.join(args.programs)}: expected train and/or infer")
  for layout in args.layouts:
    if layout not in LAYOUTS:
      sys.exit(f"pod_plan: unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
  rows = plan(args)
  smallest = {}
  for r in rows:
    smallest.setdefault(family(r.target), r.target)
  if args.quick:  # XLA:TPU's one-device compile would double --quick's time: the CPU's stands in
    smallest = {"cpu": "cpu"}
  start = time.perf_counter()
  results = run_rows(ideal_rows([r for r in rows if r.devices > 1], smallest, args.cpu_ideal)
                     + rows, args.jobs, args.timeout_s)
  order = {(r.target, r.devices, r.size, r.kind, r.layout, r.label): i for i, r in enumerate(rows)}
  joined = sorted(join(results), key=lambda r: order.get(
      tuple(r["row"][k] for k in ("target", "devices", "size", "kind", "layout", "label")), -1))
  ratio_rows = ratios(joined)
  table = markdown(joined, ratio_rows)
  print(table)
  report = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                machine=f"{platform.node()}: {os.cpu_count()} CPU cores, {platform.processor()}",
                jax=jax.__version__, argv=sys.argv[1:] if argv is None else argv,
                seconds=time.perf_counter() - start, chips=CHIPS, rows=joined,
                ratios=ratio_rows, table=table)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
  print(f"\n{len(results)} compiles in {report['seconds']:.0f} s; wrote {out / 'results.json'}")
  return report


if __name__ == "__main__":
  main()
