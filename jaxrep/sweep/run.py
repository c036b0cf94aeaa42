"""Running a sweep's cells and writing its tables.

Every cell is one `jaxrep.protocol.run` in this process: datasets are loaded
once per data setting and shared by the cells that use them, and so are the
compiled programs (cells with equal settings but their seeds and per-provider
data share one trainer, `train.make_trainer`). With `threads`, that many
cells run side by side in the process. With workers
(`sweep_workers`), the cells are split into shards, each run by its own
`python -m jaxrep.sweep --shard=i/W` process, and this process only checks,
watches and aggregates: a cell that leaves cores idle (a small model) then
shares the machine with others.
"""

from __future__ import annotations

import math
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent import futures

import numpy as np

from jaxrep import protocol
from jaxrep.config import SimConfig
from jaxrep.core.errors import ConfigError
from jaxrep.runtime import compilation
from jaxrep.runtime import workdir
from jaxrep.sweep import plots as plots_lib
from jaxrep.sweep import store
from jaxrep.sweep import table as table_lib
from jaxrep.sweep.grid import Cell, Spec


def describe(cell: Cell) -> str:
  parts = ([cell.case] if cell.case else []) + [
      f"{k}={v}" for k, v in cell.point]
  return " ".join(parts) or "the fixed settings"


class Datasets:
  """Datasets loaded once per data setting."""

  def __init__(self):
    self._held: dict = {}
    self._lock = threading.Lock()

  def get(self, config: SimConfig):
    with self._lock:
      if config.data not in self._held:
        self._held[config.data] = protocol.load(config)
      return self._held[config.data]


def check(spec: Spec, datasets: Datasets) -> None:
  """Every cell's config is valid and fits its dataset (ConfigError naming
  the cell and the field), before anything trains."""
  seen = set()
  for cell in spec.cells():
    settings = tuple(kv for kv in cell.overrides if kv[0] != "seed")
    if settings in seen:
      continue
    seen.add(settings)
    try:
      config = protocol.validate(cell.config())
      ds = datasets.get(config)
      resolved = protocol.resolve(config, ds)
      target = resolved.attack.target_label
      if target >= ds.num_classes:
        raise ConfigError(f"target_label: must be in [0, "
                          f"{ds.num_classes - 1}] (or -1), got {target}")
    except ConfigError as e:
      raise ConfigError(f"grid: cell {describe(cell)}: {e}") from None


def first_look_tpr(result) -> float:
  """Share of the malicious providers flagged at the first replicated
  sub-run."""
  mal = np.asarray(result.malicious, bool)
  if not mal.any() or not result.replicated_subruns:
    return math.nan
  first = int(result.replicated_subruns[0])
  return float((np.asarray(result.flagged_at)[mal] == first).mean())


def command(cell: Cell) -> str:
  """The main-job command that runs this cell alone."""
  args = [f"--{k}={v}" for k, v in cell.overrides if v is not None]
  return "python -m jaxrep.simulate " + " ".join(shlex.quote(a)
                                                 for a in args)


def record(cell: Cell, result) -> dict:
  """A cells.jsonl line: the cell, its config and summary (as results.json
  has them) and its wall time."""
  summary = dict(result.summary())
  summary["first_look_tpr"] = first_look_tpr(result)
  return {"cell": cell.key, "index": cell.index, "case": cell.case,
          "point": dict(cell.point), "seed": cell.seed,
          "config": result.config.flat(), "summary": summary,
          "wall_seconds": result.wall_seconds, "command": command(cell)}


def run_cell(cell: Cell, datasets: Datasets) -> dict:
  """One cell's simulation; its cells.jsonl record."""
  config = cell.config()
  result = protocol.run(config, progress=False,
                        dataset=datasets.get(config))
  return record(cell, result)


def run_cells(cells: list[Cell], writer: store.CellWriter,
              datasets: Datasets, *, progress: bool = True,
              done: int = 0, total: int | None = None,
              threads: int = 1) -> None:
  """Runs `cells`, appending each finished one (in the order they finish).

  With `threads` > 1, that many cells run side by side in this process:
  they share its compiled programs, and while one waits for its model
  another's Python and XLA work proceeds (a small model leaves cores idle).
  A cell's numbers do not depend on what runs beside it. If a cell fails,
  the cells not yet started are cancelled, those running finish (and are
  recorded) and the error is raised.
  """
  require_threads(threads)
  bar = None
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=total or len(cells), initial=done, desc="cells",
               unit="cell", dynamic_ncols=True)

  def finished(cell: Cell, rec: dict) -> None:
    writer.write(rec)
    if bar is not None:
      bar.set_postfix_str(f"{describe(cell)} seed={cell.seed}")
      bar.update(1)

  try:
    if threads == 1:
      for cell in cells:
        finished(cell, run_cell(cell, datasets))
      return
    with futures.ThreadPoolExecutor(threads) as pool:
      running = {pool.submit(run_cell, c, datasets): c for c in cells}
      error = None
      try:
        for future in futures.as_completed(running):
          if future.cancelled():
            continue
          if future.exception() is not None:
            if error is None:
              error = future.exception()
              for f in running:
                f.cancel()
            continue
          finished(running[future], future.result())
      except BaseException:   # interrupted: start no further cell
        for f in running:
          f.cancel()
        raise
      if error is not None:
        raise error
  finally:
    if bar is not None:
      bar.close()


def require_threads(threads: int) -> None:
  if int(threads) != threads or threads < 1:
    raise ConfigError(f"threads: must be an integer >= 1, got {threads!r}")


def write_tables(out: str, spec: Spec, records: list[dict]) -> list[str]:
  """table.csv, table.md and by_<axis>.png from finished cells."""
  axes = spec.axis_names
  shown = table_lib.figures(spec.figures)
  rows = table_lib.aggregate(records, axes, shown)
  paths = []
  for name, text in (("table.csv", table_lib.to_csv(rows, axes, shown)),
                     ("table.md", table_lib.to_markdown(
                         rows, axes, spec.description, shown))):
    path = os.path.join(out, name)
    # A temporary of this process's own: shards finishing together each
    # write the tables.
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
    paths.append(path)
  if rows:
    paths += plots_lib.write_plots(rows, axes, out, dict(spec.axes), shown)
  return paths


def _missing_cells(spec: Spec, out: str, shard: tuple[int, int] | None,
                   log) -> tuple[list[Cell], list[Cell]]:
  """Claims `out`'s manifest for `spec`; returns (the cells of `shard`, or
  all of them, those not yet finished in any shard of `out`)."""
  store.claim_manifest(out, spec.to_json(), spec.figures)
  cells = spec.cells()
  if shard is not None:
    cells = [c for c in cells if c.index % shard[1] == shard[0]]
  done = store.all_cells(out)
  todo = [c for c in cells if c.key not in done]
  if len(todo) < len(cells):
    log(f"resuming: {len(cells) - len(todo)} of {len(cells)} cells "
        "already finished")
  return cells, todo


def sweep(spec: Spec, out: str, *, shard: tuple[int, int] | None = None,
          progress: bool = True, datasets: Datasets | None = None,
          compilation_cache: str | None = "", log=print,
          tables: bool = True, threads: int = 1) -> list[str]:
  """Runs the cells of `spec` (or of one shard of them) that `out` does not
  hold yet (in any of its shards), `threads` at a time (`run_cells`), then
  writes the tables (unless `tables` is false); returns the files written.

  Everything is checked before anything trains (ConfigError naming the
  cell and field); `out` must hold no sweep or this one. Compiled programs
  are shared by the cells through XLA's persistent cache in
  `compilation_cache` ("" = <out>/xla_cache; None = off).
  """
  datasets = datasets or Datasets()
  require_threads(threads)
  workdir.check(out)
  check(spec, datasets)
  here = store.shard_dir(out, shard)
  claim = workdir.Claim(here)
  if compilation_cache is not None:
    compilation.enable_cache(compilation_cache or
                             os.path.join(out, "xla_cache"))
  try:
    cells, todo = _missing_cells(spec, out, shard, log)
    writer = store.CellWriter(os.path.join(here, store.CELLS))
    try:
      run_cells(todo, writer, datasets, progress=progress,
                done=len(cells) - len(todo), total=len(cells),
                threads=threads)
    finally:
      writer.close()
  finally:
    claim.release()
  if not tables:
    return []
  return write_tables(out, spec, list(store.all_cells(out).values()))


class WorkerError(RuntimeError):
  """A worker process of `sweep_workers` failed."""


def _last_line(path: str) -> str:
  try:
    with open(path, errors="replace") as f:
      lines = [l.strip() for l in f if l.strip()]
  except OSError:
    return ""
  return lines[-1] if lines else ""


def sweep_workers(spec: Spec, out: str, argv: list[str], workers: int, *,
                  progress: bool = True, datasets: Datasets | None = None,
                  poll: float = 0.5, log=print) -> list[str]:
  """Runs the missing cells of `spec` in `workers` processes, then writes
  the tables; returns the files written.

  Worker i is `python -m jaxrep.sweep <argv> --shard=i/workers --noprogress
  --notables` (argv: the sweep's own flags, which must describe `spec`); it
  writes its cells to `<out>/shard-i-of-<workers>/` and its output to
  `worker.log` there. Everything is checked here before any worker starts;
  the workers share `out`'s compilation cache (an entry read while another
  worker writes it is compiled again: XLA's cache warns and recompiles).
  Raises WorkerError naming the first worker that failed and its last line.
  """
  require_workers(workers)
  datasets = datasets or Datasets()
  workdir.check(out)
  check(spec, datasets)
  claim = workdir.Claim(out)
  try:
    cells, todo = _missing_cells(spec, out, None, log)
    shards = sorted({c.index % workers for c in todo})
    _run_workers(out, argv, workers, shards, total=len(cells),
                 progress=progress, poll=poll)
  finally:
    claim.release()
  return write_tables(out, spec, list(store.all_cells(out).values()))


def require_workers(workers: int) -> None:
  if int(workers) != workers or workers < 1:
    raise ConfigError(f"workers: must be an integer >= 1, got {workers!r}")


def _run_workers(out: str, argv: list[str], workers: int, shards: list[int],
                 *, total: int, progress: bool, poll: float) -> None:
  """Starts the workers of `shards` and waits for them, counting the cells
  they finish on a progress bar."""
  bar = None
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=total, initial=len(store.all_cells(out)), desc="cells",
               unit="cell", dynamic_ncols=True)
  procs = []
  try:
    for i in shards:
      here = store.shard_dir(out, (i, workers))
      os.makedirs(here, exist_ok=True)
      log_path = os.path.join(here, "worker.log")
      with open(log_path, "w") as f:
        procs.append((i, log_path, subprocess.Popen(
            [sys.executable, "-m", "jaxrep.sweep", *argv,
             f"--shard={i}/{workers}", "--noprogress", "--notables"],
            stdout=f, stderr=subprocess.STDOUT)))
    if bar is not None:
      bar.set_postfix_str(f"{len(procs)} workers")
    while any(p.poll() is None for _, _, p in procs):
      time.sleep(poll)
      if bar is not None:
        bar.n = len(store.all_cells(out))
        bar.refresh()
  finally:
    for _, _, p in procs:   # interrupted: stop the workers too
      if p.poll() is None:
        p.terminate()
        p.wait()
    if bar is not None:
      bar.n = len(store.all_cells(out))
      bar.close()
  for i, log_path, p in procs:
    if p.returncode != 0:
      raise WorkerError(
          f"sweep worker {i}/{workers} exited with status {p.returncode} "
          f"({_last_line(log_path) or 'no output'}); its log: {log_path}")


def merge(out: str, log=print) -> list[str]:
  """The tables of every cell in `out` and its shards (a note says how many
  cells have not finished)."""
  spec = Spec.from_json(*store.read_manifest(out))
  records = list(store.all_cells(out).values())
  total = len(spec.cells())
  if len(records) < total:
    log(f"note: {total - len(records)} of {total} cells have not finished; "
        "the tables hold the others")
  return write_tables(out, spec, records)
