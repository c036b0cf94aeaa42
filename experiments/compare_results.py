r"""Compares the results.json of two runs: per-provider results, summary and
the client's models (wall time aside).

    python experiments/compare_results.py runs/before/default runs/after/default

Used to check that a refactoring preserves behaviour: run the same command
before and after the change, into two directories, and compare. Summary keys
named with --accounting are shown but not compared (e.g. a redefined cost).
Exits 1 if anything compared differs.
"""

import json
import os
import sys

from absl import app, flags

flags.DEFINE_list("accounting", [], "summary keys to show, not compare")
FLAGS = flags.FLAGS


def _load(directory: str) -> dict:
  with open(os.path.join(directory, "results.json")) as f:
    return json.load(f)


def compare(a: dict, b: dict, accounting=()) -> list[str]:
  """The differences between two results.json dicts, one line each."""
  out = []
  for i, (pa, pb) in enumerate(zip(a["providers"], b["providers"])):
    if pa != pb:
      out.append(f"provider {i}: {pa} != {pb}")
  if len(a["providers"]) != len(b["providers"]):
    out.append("different number of providers")
  for key in sorted(set(a["summary"]) | set(b["summary"])):
    va, vb = a["summary"].get(key), b["summary"].get(key)
    if key == "wall_seconds" or va == vb:
      continue
    note = " (accounting, not compared)" if key in accounting else ""
    line = f"summary {key}: {va} != {vb}{note}"
    print(line)
    if not note:
      out.append(line)
  if a.get("client") != b.get("client"):
    out.append("client models differ")
  return out


def main(argv):
  if len(argv) != 3:
    raise app.UsageError("usage: compare_results.py DIR_A DIR_B")
  diffs = compare(_load(argv[1]), _load(argv[2]), FLAGS.accounting)
  for d in diffs:
    print(d)
  print("same" if not diffs else f"{len(diffs)} differences")
  sys.exit(1 if diffs else 0)


if __name__ == "__main__":
  app.run(main)
