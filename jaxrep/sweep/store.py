"""A sweep's directory: its manifest and one line per finished cell.

    <out>/sweep.json            the spec (a different spec here is refused)
    <out>/cells.jsonl           one JSON line per finished cell
    <out>/shard-I-of-N/cells.jsonl   the same, for shard I of N (--shard)

A line is appended and flushed to disk only when its cell has finished, so
a killed sweep loses at most the cells that were running; a torn last line
(the process died while writing it) is ignored on reading and the cell runs
again.
"""

from __future__ import annotations

import glob
import json
import os

from jaxrep.core.errors import ConfigError
from jaxrep.report import results as results_lib

MANIFEST = "sweep.json"
CELLS = "cells.jsonl"


def parse_shard(text: str | None) -> tuple[int, int] | None:
  """"i/N" -> (i, N) with 0 <= i < N; None or "" -> None."""
  if not text:
    return None
  try:
    i, n = (int(v) for v in text.split("/"))
  except ValueError:
    raise ConfigError(f"shard: {text!r} is not i/N (e.g. 0/4)") from None
  if n < 1 or not 0 <= i < n:
    raise ConfigError(f"shard: {text!r} needs N >= 1 and 0 <= i < N")
  return i, n


def shard_dir(out: str, shard: tuple[int, int] | None) -> str:
  """Where a shard (or the whole sweep) writes its cells."""
  if shard is None:
    return out
  return os.path.join(out, f"shard-{shard[0]}-of-{shard[1]}")


def claim_manifest(out: str, spec_json: dict, figures=()) -> None:
  """Writes the manifest, or checks that the one in `out` is this spec
  (the tables' `figures` are recorded for --merge, not compared)."""
  path = os.path.join(out, MANIFEST)
  if os.path.exists(path):
    try:
      with open(path) as f:
        held = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ConfigError(f"out: {path} is unreadable ({e}); remove it or "
                        "choose another --out") from None
    if held.get("spec") != spec_json:
      diff = sorted(k for k in set(held.get("spec", {})) | set(spec_json)
                    if held.get("spec", {}).get(k) != spec_json.get(k))
      raise ConfigError(
          f"out: {out} holds a different sweep (its {', '.join(diff)} "
          "differ); rerun that sweep's command to finish it, or choose "
          "another --out")
    if list(held.get("figures", [])) == list(figures):
      return
  os.makedirs(out, exist_ok=True)
  results_lib.write_json_atomic(path, {"spec": spec_json,
                                       "figures": list(figures)})


def read_manifest(out: str) -> tuple[dict, tuple]:
  """(spec, figures) of the sweep in `out`."""
  path = os.path.join(out, MANIFEST)
  if not os.path.exists(path):
    raise ConfigError(f"out: {out} holds no sweep ({MANIFEST} is missing)")
  with open(path) as f:
    held = json.load(f)
  return held["spec"], tuple(held.get("figures", ()))


def read_cells(path: str) -> dict[str, dict]:
  """Finished cells of one cells.jsonl, by cell key (a torn last line is
  skipped)."""
  done: dict[str, dict] = {}
  if not os.path.exists(path):
    return done
  with open(path) as f:
    lines = f.read().split("\n")
  for number, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      done[record["cell"]] = record
    except (json.JSONDecodeError, KeyError, TypeError):
      if number < len(lines) - 1 and any(l.strip() for l in lines[number + 1:]):
        raise ConfigError(f"out: {path} line {number + 1} is corrupt; "
                          "remove that line to rerun its cell") from None
  return done


def all_cells(out: str) -> dict[str, dict]:
  """Every finished cell of a sweep directory and its shards."""
  done: dict[str, dict] = {}
  paths = [os.path.join(out, CELLS)] + sorted(
      glob.glob(os.path.join(out, "shard-*-of-*", CELLS)))
  for path in paths:
    done.update(read_cells(path))
  return done


class CellWriter:
  """Appends finished cells to a cells.jsonl (each line fsync'ed)."""

  def __init__(self, path: str):
    self.path = path
    if os.path.exists(path):
      with open(path, "rb") as f:
        data = f.read()
      if data and not data.endswith(b"\n"):   # a torn last line
        keep = data[:data.rfind(b"\n") + 1]
        with open(path, "wb") as f:
          f.write(keep)
    self._file = open(path, "a")

  def write(self, record: dict) -> None:
    self._file.write(json.dumps(results_lib.clean(record),
                                allow_nan=False) + "\n")
    self._file.flush()
    os.fsync(self._file.fileno())

  def close(self) -> None:
    self._file.close()
