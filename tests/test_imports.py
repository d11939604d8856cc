"""The package's import map: no cycles, and no imports inside functions except for optional
dependencies and slow imports deferred for start-up time (each named here with its reason)."""

import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pkm_jax")

# (module, imported name) pairs allowed inside a function, and why.
DEFERRED = {
    ("pkm_jax.convert", "torch"): "optional: only pytorch_model.bin needs torch",
    ("pkm_jax.data.sources", "tensorflow_datasets"): "slow import, only for data.source=tfds",
    ("pkm_jax.tasks.glue", "tensorflow_datasets.text.glue"): "slow import, only for TFDS GLUE",
    ("pkm_jax.tasks.squad", "tensorflow_datasets.question_answering.squad"):
        "slow import, only for TFDS SQuAD",
}


def modules() -> dict[str, str]:
  """{'pkm_jax.memory': path} for every module of the package."""
  out = {}
  for root, _, files in os.walk(PKG):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return out


def imports(path: str, known: set[str]) -> tuple[set[str], list[tuple[str, int]]]:
  """(package modules imported anywhere in the file, [(name, line)] imported inside a def)."""
  tree = ast.parse(open(path).read())
  found, nested = set(), []
  function_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef,
                                                                     ast.AsyncFunctionDef))
                    for n in ast.walk(f) if n is not f}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    if id(node) in function_nodes:
      nested.append((names[0], node.lineno))
    found |= {n for n in names if n in known}
  return found, nested


def import_map() -> dict[str, set[str]]:
  mods = modules()
  return {m: imports(p, set(mods))[0] - {m} for m, p in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_no_import_cycles():
  graph = import_map()
  # A package __init__ re-exporting its modules is an edge parent -> child; a child importing
  # a sibling through the package is not a cycle through the parent.
  graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
  cycle = find_cycle(graph)
  assert cycle is None, " -> ".join(cycle)


def test_cycle_detector_finds_a_planted_cycle():
  # Positive control: the detector is not vacuous.
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_imports_inside_functions_but_the_deferred_ones():
  mods = modules()
  found = []
  for module, path in mods.items():
    for name, line in imports(path, set(mods))[1]:
      if (module, name) not in DEFERRED:
        found.append(f"{module}:{line} imports {name}")
  assert not found, "; ".join(found)
