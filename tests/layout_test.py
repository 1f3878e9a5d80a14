"""The code's shape: import direction, module size, and no run diaries in the library."""

import ast
import os
import re

import pytest
from conftest import REPO

PACKAGE = os.path.join(REPO, "jaxlm")
MAX_MODULE_LINES = 460  # About 450: a module past this is doing more than one job; split it.


def modules() -> dict[str, str]:
  """Dotted module name -> path, for every .py file under jaxlm/."""
  out = {}
  for dirpath, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, f), REPO)[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__")] = os.path.join(dirpath, f)
  return out


def imports_of(path: str, known: set[str], *, top_level_only: bool) -> set[str]:
  """The jaxlm modules a file imports (lazy imports inside functions too, unless told not)."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  nodes = tree.body if top_level_only else ast.walk(tree)
  out = set()
  for node in nodes:
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("jaxlm")}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxlm"):
      for a in node.names:  # `from jaxlm.host import xla` names a module; `import X` a symbol.
        sub = f"{node.module}.{a.name}"
        out.add(sub if sub in known else node.module)
  return {m for m in out if m in known}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}  # 1 = on the current path, 2 = done.
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


@pytest.mark.parametrize("top_level_only", [True, False], ids=["module-level", "all"])
def test_import_graph_has_no_cycle(top_level_only):
  mods = modules()
  graph = {m: imports_of(p, set(mods), top_level_only=top_level_only) - {m}
           for m, p in mods.items()}
  # A package's __init__ may re-export its own modules; that is not a cycle of dependencies.
  for m in graph:
    graph[m] = {d for d in graph[m] if not (m != d and m.startswith(d + "."))}
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_nothing_below_the_cli_imports_the_training_loop():
  mods = modules()
  offenders = [m for m, p in mods.items()
               if not (m == "jaxlm.cli" or m.startswith("jaxlm.cli.") or m == "jaxlm.train")
               and "jaxlm.train" in imports_of(p, set(mods), top_level_only=False)]
  assert not offenders, f"these import jaxlm.train: {offenders}"


def test_no_module_is_too_long():
  long = {m: n for m, p in modules().items()
          if (n := sum(1 for _ in open(p, encoding="utf-8"))) > MAX_MODULE_LINES}
  assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_train_and_evaluate_reads_as_a_short_sequence():
  tree = ast.parse(open(os.path.join(PACKAGE, "train.py"), encoding="utf-8").read())
  fn = next(n for n in tree.body
            if isinstance(n, ast.FunctionDef) and n.name == "train_and_evaluate")
  assert fn.end_lineno - fn.lineno + 1 <= 100


# Labels of particular runs ("session 3's run", "run 12") go stale the day they are written:
# measured numbers live in experiments/*/README.md and results files, which say when and how.
RUN_DIARY = re.compile(r"\bsession \d+\b|\b(run|trial) #?\d+\b", re.IGNORECASE)


def test_the_library_keeps_no_run_diary():
  hits = []
  for p in modules().values():
    for i, line in enumerate(open(p, encoding="utf-8"), 1):
      if RUN_DIARY.search(line):
        hits.append(f"{os.path.relpath(p, REPO)}:{i}: {line.strip()}")
  assert not hits, "\n".join(hits)


def test_the_run_diary_check_would_catch_one():
  assert RUN_DIARY.search("34.4-34.6 ms (session 3's run)")
  assert not RUN_DIARY.search("the run resumes from its latest checkpoint")
