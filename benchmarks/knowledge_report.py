"""The knowledge benchmark's report: per-method summaries over seeds, the equal-B-accuracy
interpolation, the markdown table, the ASCII learning-against-forgetting plot and the targets.

Pure functions of the recorded runs (`benchmarks/knowledge.py` measures them).
"""

from __future__ import annotations

import math
from typing import Any

# The common B accuracy: this share of the lowest of the methods' best mean B accuracies.
TARGET_SHARE = 0.8

def interpolate(xs: list[float], ys: list[float], target: float) -> float | None:
  """y where the polyline (xs[i], ys[i]) (in sweep order) first reaches x = target; None if it
  never does."""
  if xs[0] >= target:
    return ys[0]
  for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
    if x0 < target <= x1:
      return y0 + (target - x0) / (x1 - x0) * (y1 - y0)
  return None


def mean_sd(values: list[float | None]) -> tuple[float, float, int]:
  """(mean, sample standard deviation (0 for one value), count) of the values that exist."""
  v = [x for x in values if x is not None and not math.isnan(x)]
  if not v:
    return float("nan"), float("nan"), 0
  m = sum(v) / len(v)
  sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
  return m, sd, len(v)


def summarize(before: dict[str, Any], runs: dict[str, dict[int, dict]], steps: list[int],
              templates: str = "held_out") -> tuple[float, dict[str, dict[str, Any]]]:
  """(target B accuracy, per method: the sweep per seed, the operating point, the drop at the
  target), on the questions in `templates` phrasings ('held_out' | 'train'). Step 0 of every
  sweep is the pretrained model."""
  b, a = ("acc_b", "acc_a") if templates == "held_out" else ("acc_b_train", "acc_a_train")
  sweeps = {}
  for method, seeds in runs.items():
    sweep: dict[str, Any] = {"steps": [0] + steps, "seeds": sorted(seeds)}
    for key in ("new_fact_accuracy", "old_fact_accuracy", "old_fact_accuracy_drop",
                "old_fact_relative_drop", "ppl_a"):
      sweep[key] = []
    for seed in sorted(seeds):
      pts = [before] + seeds[seed]["points"]
      sweep["new_fact_accuracy"].append([p[b] for p in pts])
      sweep["old_fact_accuracy"].append([p[a] for p in pts])
      drops = [before[a] - p[a] for p in pts]
      sweep["old_fact_accuracy_drop"].append(drops)
      sweep["old_fact_relative_drop"].append(
          [d / before[a] if before[a] > 0 else float("nan") for d in drops])
      sweep["ppl_a"].append([p["ppl_a"] for p in pts])
    sweeps[method] = sweep
  mean_b = {m: [mean_sd([s[i] for s in sw["new_fact_accuracy"]])[0]
                for i in range(len(sw["steps"]))] for m, sw in sweeps.items()}
  target = TARGET_SHARE * min(max(v) for v in mean_b.values())
  out = {}
  for method, sw in sweeps.items():
    n = len(sw["steps"])
    op = next((i for i in range(1, n) if mean_b[method][i] >= target), n - 1)
    at = lambda key: [s[op] for s in sw[key]]  # noqa: E731
    out[method] = {
        "lr": None, "templates": templates, "operating_step": sw["steps"][op],
        "new_fact_accuracy": at("new_fact_accuracy"),
        "old_fact_accuracy": at("old_fact_accuracy"),
        "old_fact_accuracy_drop": at("old_fact_accuracy_drop"),
        "old_fact_relative_drop": at("old_fact_relative_drop"),
        "ppl_a": at("ppl_a"),
        "drop_at_target": [interpolate(b, d, target) for b, d in
                           zip(sw["new_fact_accuracy"], sw["old_fact_accuracy_drop"])],
        "sweep": sw}
  return target, out


def _pm(values: list[float | None], scale: float = 100.0, fmt: str = ".1f") -> str:
  m, sd, n = mean_sd(values)
  if not n:
    return "-"
  return f"{format(scale * m, fmt)} ± {format(scale * sd, fmt)}" + (
      f" ({n}/{len(values)})" if n < len(values) else "")


def markdown_table(before: dict[str, Any], target: float, methods: dict[str, dict[str, Any]],
                   layers: list[int]) -> str:
  b = "acc_b" if next(iter(methods.values()))["templates"] == "held_out" else "acc_b_train"
  names = "/".join(f"{layer + 1}L" for layer in layers)
  header = ["Method", "lr", "steps", "B acc (%)", "A-probe drop (pts)", "relative drop (%)",
            f"A drop at B = {100 * target:.1f}% (pts)", "A ppl",
            f"rows written ({names})", f"of them in A's top-t ({names})",
            f"MU ({names}) (%)", f"KL_u ({names})"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines.append("| pretrained (A) | - | 0 | " + f"{100 * before[b]:.1f} | - | - | - | "
               f"{before['ppl_a']:.2f} | - | - | "
               + "/".join(f"{before['memory'][str(l)]['usage']:.1f}" for l in layers) + " | "
               + "/".join(f"{before['memory'][str(l)]['kl_uniform']:.2f}" for l in layers)
               + " |")
  for method, r in methods.items():
    slots = r["slots"]
    per_layer = lambda key, fmt: "/".join(  # noqa: E731
        format(mean_sd(slots[str(l)][key])[0], fmt) for l in layers)
    lines.append(
        f"| {method} | {r['lr']:g} | {r['operating_step']} | {_pm(r['new_fact_accuracy'])} | "
        f"{_pm(r['old_fact_accuracy_drop'])} | {_pm(r['old_fact_relative_drop'])} | "
        f"{_pm(r['drop_at_target'])} | {_pm(r['ppl_a'], 1.0, '.2f')} | "
        f"{per_layer('written', '.0f')} | {per_layer('in_a_top', '.0f')} | "
        f"{per_layer('usage', '.1f')} | {per_layer('kl_uniform', '.2f')} |")
  return "\n".join(lines)


def ascii_plot(methods: dict[str, dict[str, Any]], target: float, width: int = 61,
               height: int = 17) -> str:
  """Learning (x: B accuracy) against forgetting (y: A-probe drop), seed means of each sweep
  point; a method's letter marks its points, '|' the target B accuracy."""
  pts = []
  for method, r in methods.items():
    sw = r["sweep"]
    for i in range(len(sw["steps"])):
      x = mean_sd([s[i] for s in sw["new_fact_accuracy"]])[0]
      y = mean_sd([s[i] for s in sw["old_fact_accuracy_drop"]])[0]
      pts.append((method, x, y))
  xmax = max(max(p[1] for p in pts), target, 1e-6)
  ymin, ymax = min(0.0, min(p[2] for p in pts)), max(max(p[2] for p in pts), 1e-6)
  grid = [[" "] * width for _ in range(height)]
  tx = round(target / xmax * (width - 1))
  for row in grid:
    row[tx] = "|"
  letters = {m: m[0].upper() if m != "sparse_memory" else "S" for m in methods}
  letters.update({"memory": "M", "lora": "L", "full": "F"})
  for method, x, y in pts:
    col = round(x / xmax * (width - 1))
    row = height - 1 - round((y - ymin) / (ymax - ymin) * (height - 1))
    grid[row][col] = letters[method] if grid[row][col] in " |" else "*"
  lines = [f"A drop {100 * ymax:5.1f} +" + "".join(grid[0])]
  lines += ["             |" + "".join(r) for r in grid[1:-1]]
  lines += [f"A drop {100 * ymin:5.1f} +" + "".join(grid[-1])]
  lines += ["             +" + "-" * width,
            f"             B acc 0{' ' * (width - 12)}{100 * xmax:.1f}%",
            "  " + ", ".join(f"{l} = {m}" for m, l in letters.items() if m in methods)
            + f", * = several; | = target {100 * target:.1f}%"]
  return "\n".join(lines)


def view(before: dict[str, Any], runs: dict[str, dict[int, dict]], steps: list[int],
         layers: list[int], lrs: dict[str, float], templates: str) -> dict[str, Any]:
  """The summary, table, ASCII plot and target checks on one set of questions."""
  target, summary = summarize(before, runs, steps, templates)
  for method, r in summary.items():
    r["lr"] = lrs[method]
    op = steps.index(r["operating_step"]) if r["operating_step"] in steps else len(steps) - 1
    pts = [runs[method][seed]["points"][op] for seed in sorted(runs[method])]
    r["slots"] = {str(l): {k: [p["slots"][str(l)].get(k) for p in pts]
                           for k in pts[0]["slots"][str(l)]} for l in layers}
    for l in layers:
      r["slots"][str(l)]["usage"] = [p["memory"][str(l)]["usage"] for p in pts]
      r["slots"][str(l)]["kl_uniform"] = [p["memory"][str(l)]["kl_uniform"] for p in pts]
    r["points"] = {str(seed): runs[method][seed]["points"] for seed in sorted(runs[method])}
  return {"templates": templates, "target": target, "methods": summary,
          "table": markdown_table(before, target, summary, layers),
          "ascii_plot": ascii_plot(summary, target),
          "checks": target_checks(summary, target,
                                  before["acc_b" if templates == "held_out" else "acc_b_train"])}


def target_checks(summary: dict[str, dict[str, Any]], target: float, before_b: float
                  ) -> list[dict[str, Any]]:
  """The issue's targets on the measured drops at equal B accuracy (seed means). A target at or
  below the pretrained model's B accuracy asks no method to learn anything: undecided (False)."""
  drop = {m: mean_sd(r["drop_at_target"])[0] for m, r in summary.items()}
  if target <= before_b:
    return [{"claim": f"undecided: the common B accuracy {100 * target:.1f}% is not above the "
                      f"pretrained model's {100 * before_b:.1f}% (some method did not learn B)",
             "holds": False}]
  out = []
  if "sparse_memory" in drop and "full" in drop:
    out.append(("sparse_memory's A drop at equal B accuracy <= 1/3 of full's "
                f"({100 * drop['sparse_memory']:.1f} vs {100 * drop['full']:.1f} pts)",
                drop["sparse_memory"] <= drop["full"] / 3))
  if "sparse_memory" in drop and "lora" in drop:
    out.append((f"sparse_memory's A drop < lora's ({100 * drop['sparse_memory']:.1f} vs "
                f"{100 * drop['lora']:.1f} pts)", drop["sparse_memory"] < drop["lora"]))
  return [{"claim": c, "holds": bool(h)} for c, h in out]
