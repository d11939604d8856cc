"""What a compiled program does per device, read from XLA itself: FLOPs and bytes accessed
(`cost_analysis()`), peak memory (`memory_analysis()`), and from the optimized HLO text
(`compiled.as_text()`) the bytes each collective moves, the while loops and their trip counts,
sorts, conditionals and custom calls.

The HLO is the partitioned, per-device program, so every figure is per device. An instruction
inside a while body counts once per iteration: the trip count is XLA's `known_trip_count`
(backend_config) where it wrote one, else read off the loop condition (`i < N` with `i` starting
from a constant), else unknown (counted once, and `unknown_trip_counts` says how many).

Collective bytes are the data one device hands to the collective: the operands of all-reduce,
reduce-scatter, all-to-all and collective-permute, the result of all-gather (what arrives).
Async pairs (`*-start` / `*-done`) count once, at the start; so do XLA:TPU's async collective
fusions, which repeat one collective in the start, continuation and done fusions under one
`chain_id`. Only one branch of a conditional runs: its branches count as their average.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16,
         "bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64,
         "c64": 64, "c128": 128}
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s+=\s+(.*)$")
_CALLED = re.compile(r"\b(calls|to_apply|body|true_computation|false_computation)=%?([\w.\-]+)")
_CALLED_LISTS = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")
_COMMENT = re.compile(r"/\*.*?\*/")
_CHAIN = re.compile(r'chain_id="(\d+)"')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


@dataclasses.dataclass
class Instr:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  attrs: str


def _closing(s: str, start: int) -> int:
  """Index of the ')' matching the '(' at s[start]."""
  depth = 0
  for i in range(start, len(s)):
    if s[i] in "([{":
      depth += 1
    elif s[i] in ")]}":
      depth -= 1
      if depth == 0:
        return i
  raise ValueError(f"unbalanced HLO: {s[:200]}")


def _split_top(s: str) -> list[str]:
  parts, depth, cur = [], 0, []
  for ch in s:
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    if ch == "," and depth == 0:
      parts.append("".join(cur).strip())
      cur = []
    else:
      cur.append(ch)
  if "".join(cur).strip():
    parts.append("".join(cur).strip())
  return parts


def _parse_instr(line: str) -> Instr | None:
  m = _INSTR.match(line)
  if not m:
    return None
  name, rest = m.group(1), m.group(2)
  if rest.startswith("("):  # a tuple shape
    end = _closing(rest, 0) + 1
  else:
    end = rest.find(" ")
  shape, rest = rest[:end], rest[end:].lstrip()
  paren = rest.find("(")
  if paren < 0:
    return None
  opcode = rest[:paren]
  close = _closing(rest, paren)
  # Operands are `%name` (TPU) or `f32[2]{0} %name` (CPU); a constant's are its literal.
  operands = [op.split()[-1].lstrip("%") for op in _split_top(rest[paren + 1:close]) if op]
  return Instr(name, shape, opcode, operands, rest[close + 1:])


def parse_hlo(text: str) -> tuple[dict[str, list[Instr]], str]:
  """HLO module text -> ({computation name: its instructions}, the entry computation's name)."""
  comps: dict[str, list[Instr]] = {}
  entry, current = "", None
  for line in text.splitlines():
    line = _COMMENT.sub("", line)  # `/*index=5*/` in long operand lists
    header = _HEADER.match(line)
    if header:
      current = header.group(2)
      comps[current] = []
      if header.group(1):
        entry = current
    elif line.strip() == "}":
      current = None
    elif current is not None:
      instr = _parse_instr(line)
      if instr is not None:
        comps[current].append(instr)
  if not entry:
    raise ValueError("no ENTRY computation in the HLO text")
  return comps, entry


def shape_bytes(shape: str) -> int:
  """Bytes of every array in an HLO shape string, e.g. '(f32[8,4]{1,0}, s32[])' -> 132."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype in _BITS:
      total += math.prod(int(d) for d in dims.split(",") if d) * _BITS[dtype] // 8
  return total


def _trip_count(instr: Instr, comps: dict[str, list[Instr]], defs: dict[str, Instr]
                ) -> int | None:
  known = _TRIP.search(instr.attrs)
  if known:
    return int(known.group(1))
  cond = re.search(r"\bcondition=%?([\w.\-]+)", instr.attrs)
  if not cond or cond.group(1) not in comps:
    return None
  cond_defs = {i.name: i for i in comps[cond.group(1)]}
  compares = [i for i in comps[cond.group(1)] if i.opcode == "compare"]
  if len(compares) != 1 or len(compares[0].operands) != 2:
    return None
  direction = re.search(r"direction=(\w+)", compares[0].attrs)
  counter, bound = (cond_defs.get(o) for o in compares[0].operands)
  if (direction is None or direction.group(1) not in ("LT", "LE") or counter is None
      or bound is None or counter.opcode != "get-tuple-element" or bound.opcode != "constant"):
    return None
  index = int(re.search(r"index=(\d+)", counter.attrs).group(1))
  init = defs.get(instr.operands[0]) if instr.operands else None
  if init is None or init.opcode != "tuple" or index >= len(init.operands):
    return None
  start = defs.get(init.operands[index])
  while start is not None and start.opcode == "copy":
    start = defs.get(start.operands[0])
  if start is None or start.opcode != "constant":
    return None
  n = int(bound.operands[0]) - int(start.operands[0])
  return max(0, n + (direction.group(1) == "LE"))


def hlo_stats(text: str) -> dict[str, Any]:
  """Per-device collectives, loops, sorts, conditionals and custom calls of an HLO module's text.

  Returns {'collective_bytes': {kind: bytes}, 'collective_count': {kind: ops executed},
  'loops': [{'name', 'trip_count', 'executions'}], 'loop_iterations' (sum of trip_count x
  executions), 'unknown_trip_counts', 'sorts', 'conditionals' (instructions executed),
  'custom_calls': {target: count}}.
  """
  comps, entry = parse_hlo(text)
  defs = {i.name: i for instrs in comps.values() for i in instrs}
  coll_bytes: dict[str, float] = collections.defaultdict(float)
  coll_count: dict[str, float] = collections.defaultdict(float)
  counts: dict[str, float] = collections.defaultdict(float)
  custom: dict[str, float] = collections.defaultdict(float)
  loops: list[dict] = []
  chains: set[str] = set()
  unknown = 0

  def visit(comp: str, times: float, depth: int = 0) -> None:
    nonlocal unknown
    if depth > 64:
      raise ValueError("HLO call graph deeper than 64: cyclic?")
    for instr in comps.get(comp, ()):
      kind = instr.opcode.removesuffix("-start")
      chain = _CHAIN.search(instr.attrs)
      if kind in COLLECTIVES and chain and chain.group(1) in chains:
        pass  # a later piece of an async collective fusion already counted
      elif kind in COLLECTIVES:
        if chain:
          chains.add(chain.group(1))
        if kind == "all-gather":
          # What it gathers into: every result array (XLA's combiner joins several gathers into
          # one op with a tuple result); an async start's shape also holds its operands.
          size = shape_bytes(instr.shape)
          if instr.opcode.endswith("-start"):
            size -= sum(shape_bytes(defs[o].shape) if o in defs else 0 for o in instr.operands)
        else:
          size = sum(shape_bytes(defs[o].shape) if o in defs else 0 for o in instr.operands)
          size = size or shape_bytes(instr.shape)
        coll_bytes[kind] += size * times
        coll_count[kind] += times
      elif instr.opcode in ("sort", "conditional"):
        counts[instr.opcode] += times
      elif instr.opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', instr.attrs)
        custom[target.group(1) if target else "?"] += times
      trip = 1
      if instr.opcode == "while":
        found = _trip_count(instr, comps, defs)
        unknown += found is None
        trip = 1 if found is None else found
        loops.append(dict(name=instr.name, trip_count=found, executions=times))
      # (reduction computations, to_apply, hold no collectives: `call`'s to_apply may)
      called = [(m.group(1), m.group(2)) for m in _CALLED.finditer(instr.attrs)]
      for m in _CALLED_LISTS.finditer(instr.attrs):
        called += [(m.group(1), c.strip().lstrip("%")) for c in m.group(2).split(",")
                   if c.strip()]
      branches = sum(role in ("branch_computations", "true_computation", "false_computation")
                     for role, _ in called)
      for role, child in called:
        share = (trip if role == "body" else
                 1 / branches if role in ("branch_computations", "true_computation",
                                          "false_computation") else 1)
        visit(child, times * share, depth + 1)

  visit(entry, 1.0)
  return dict(
      collective_bytes={k: coll_bytes.get(k, 0.0) for k in COLLECTIVES},
      collective_count={k: coll_count.get(k, 0.0) for k in COLLECTIVES},
      loops=loops,
      loop_iterations=sum((l["trip_count"] or 1) * l["executions"] for l in loops),
      unknown_trip_counts=unknown,
      sorts=counts["sort"], conditionals=counts["conditional"], custom_calls=dict(custom))


def cost(compiled) -> dict[str, float]:
  """`cost_analysis()` as one dict (older jax returned a list of one; XLA:GPU compiling without
  a GPU returns None: {})."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return dict(analysis or {})


def program_stats(compiled) -> dict[str, Any]:
  """A compiled program's per-device figures: flops, bytes_accessed (None where the backend has
  no cost analysis), peak_bytes (arguments + temporaries + outputs - aliased), the memory
  analysis' parts, and `hlo_stats`."""
  c = cost(compiled)
  mem = compiled.memory_analysis()
  memory = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
            for k in ("argument", "output", "temp", "alias", "generated_code")}
  peak = memory["argument"] + memory["temp"] + memory["output"] - memory["alias"]
  return dict(flops=float(c["flops"]) if "flops" in c else None,
              bytes_accessed=float(c["bytes accessed"]) if "bytes accessed" in c else None,
              peak_bytes=peak, memory=memory, **hlo_stats(compiled.as_text()))
