"""The package layout shows the data flow: every import points to the same or
an earlier stage, and no module imports itself through others (no cycles)."""

import ast
import os

import pytest

import jaxrep

PKG = os.path.dirname(jaxrep.__file__)
# Stages in data-flow order; runtime (mesh, memory, multi-host, checkpoint)
# sits beside them, below every stage that places arrays on devices.
STAGES = ("core", "config", "runtime", "data", "models", "population",
          "train", "distances", "detect", "protocol", "report")
ENTRY = len(STAGES)   # jaxrep/__init__, simulate, sweep: may import anything


def _modules():
  for dirpath, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, os.path.dirname(PKG))[:-3]
        name = rel.replace(os.sep, ".")
        if name.endswith(".__init__"):
          name = name[:-len(".__init__")]
        yield name, path


def _stage(module: str) -> int:
  parts = module.split(".")
  if len(parts) == 1:
    return ENTRY
  head = parts[1]
  return STAGES.index(head) if head in STAGES else ENTRY


def _imports(path: str, module: str) -> set[str]:
  tree = ast.parse(open(path).read())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith("jaxrep")}
    elif isinstance(node, ast.ImportFrom) and node.module:
      base = node.module
      if node.level:
        pkg = module.split(".")[:len(module.split(".")) - node.level]
        base = ".".join(pkg + [node.module])
      if base.startswith("jaxrep"):
        for a in node.names:
          sub = f"{base}.{a.name}"
          found.add(sub if sub in MODULES else base)
  return found


MODULES = dict(_modules())
GRAPH = {m: _imports(p, m) for m, p in MODULES.items()}


def test_every_stage_folder_exists():
  for stage in STAGES:
    if stage == "config":
      assert "jaxrep.config" in MODULES
    else:
      assert f"jaxrep.{stage}" in MODULES, stage


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_to_earlier_stages(module):
  if module == "jaxrep":
    return
  late = sorted(i for i in GRAPH[module] if _stage(i) > _stage(module))
  assert not late, f"{module} imports later stages: {late}"


def test_no_import_cycles():
  edges = {m: {i for i in deps if i in GRAPH and i != m}
           for m, deps in GRAPH.items() if m != "jaxrep"}
  # Package __init__ files that re-export their own modules are not cycles.
  for m in edges:
    edges[m] = {i for i in edges[m] if not (m.startswith(i + ".")
                                            and i in MODULES)}
  state = {}

  def visit(m, stack):
    state[m] = 1
    for i in edges.get(m, ()):
      if state.get(i) == 1:
        raise AssertionError("import cycle: " + " -> ".join(stack + [i]))
      if i not in state:
        visit(i, stack + [i])
    state[m] = 2

  for m in sorted(edges):
    if m not in state:
      visit(m, [m])
