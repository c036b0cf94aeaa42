r"""Sweeps: every cell of a grid of scenarios x seeds, aggregated over seeds.

    python -m jaxrep.sweep --grid='malicious=2,4,8 attack=badnets,blend' \
        --seeds=0:10 --out=runs/sweep --steps=200      # any simulate flag
    python -m jaxrep.sweep --config=experiments/studies/headline.toml \
        --out=runs/headline
    python -m jaxrep.sweep --config=... --out=DIR --shard=0/4   # job array
    python -m jaxrep.sweep --out=DIR --merge        # tables of all shards
    python -m jaxrep.sweep --config=... --out=DIR --threads=2  # 2 at once
    python -m jaxrep.sweep --config=... --out=DIR --workers=2  # 2 processes

A cell is one simulation (`python -m jaxrep.simulate` with the cell's
settings; each line of cells.jsonl says which command). Flags of the main
job given here are fixed settings of every cell; --grid axes take a
space-separated list of field=value,value,...; --seeds is lo:hi (hi
excluded) or a comma-separated list. A study file (--config, TOML) holds
`description`, `seeds`, `[fixed]`, `[grid]` and `[[cases]]` (named sets of
settings crossed with the grid); the command line's --grid, --seeds and
flags override it.

Writes to --out: sweep.json (the spec), cells.jsonl (one line per finished
cell: its config and summary as results.json has them), table.csv and
table.md (mean and 95 % interval over seeds of every summary figure) and
by_<axis>.png; xla_cache/ holds the compiled programs the cells share.
--threads=T runs T cells side by side in the process (sharing its
compiled programs); --workers=W runs the cells in W processes on this
machine (shards 0..W-1 of them, aggregated at the end; each with
--threads). Killing a sweep and running the same command again runs only
the missing cells (whatever the workers or shards
that ran the others); a different sweep in the same --out is refused. Bad grids
exit with status 2 and one line, before any training.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from jaxrep import cli
from jaxrep.core.errors import ConfigError
from jaxrep.runtime import workdir
from jaxrep.sweep import grid as grid_lib
from jaxrep.sweep import run as run_lib
from jaxrep.sweep import store

FLAGS = flags.FLAGS

cli.define_config_flags()
flags.DEFINE_string("grid", "", "axes: 'field=v1,v2 field=v1,...' (a "
                    "simulate flag or section.field per axis)")
flags.DEFINE_string("seeds", None, "seeds of every grid point: lo:hi (hi "
                    "excluded) or a comma-separated list (default: the study "
                    "file's, else 0)")
flags.DEFINE_string("config", None, "a study file (TOML): description, "
                    "seeds, [fixed], [grid], [[cases]]")
flags.DEFINE_string("out", "runs/sweep", "output directory")
flags.DEFINE_list("figures", [], "summary figures of the tables (default: "
                  "the study file's, else TPR, FPR, first-look TPR, client "
                  "ASR and clean accuracy with and without RTTD, overhead, "
                  "wall time)")
flags.DEFINE_string("shard", None, "run only share i of N of the cells "
                    "(i/N, 0 <= i < N; e.g. a job array)")
flags.DEFINE_bool("merge", False, "only aggregate the cells (and shards) in "
                  "--out into the tables")
flags.DEFINE_bool("progress", True, "show a progress bar over cells")
flags.DEFINE_integer("workers", 1, "processes running cells side by side on "
                     "this machine (each takes a shard; a small model leaves "
                     "cores idle, so 2 or more can finish a sweep sooner)")
flags.DEFINE_integer("threads", 1, "cells running side by side in each "
                     "process (they share its compiled programs; on a CPU a "
                     "small model leaves cores idle: 2 finish a digits sweep "
                     "about 1.4x sooner)")
flags.DEFINE_bool("tables", True, "write the tables after the cells (the "
                  "workers of --workers leave it to their parent)")
flags.DEFINE_string("compilation_cache", "", "directory of XLA's persistent "
                    "compilation cache, shared by the cells (default "
                    "<out>/xla_cache; 'none': off)")


def _fail(message: str) -> None:
  cli.fail(message)


def _spec() -> grid_lib.Spec:
  fixed = cli.given_config_flags()
  if "seed" in fixed:
    raise ConfigError("seed: a sweep's seeds are given by --seeds")
  if FLAGS.config:
    return grid_lib.Spec.from_file(FLAGS.config, grid=FLAGS.grid,
                                   seeds=FLAGS.seeds, fixed=fixed,
                                   figures=FLAGS.figures)
  return grid_lib.Spec.parse(grid=FLAGS.grid, seeds=FLAGS.seeds or "0",
                             fixed=fixed, figures=FLAGS.figures)


def _show(out: str, paths: list[str]) -> None:
  with open(os.path.join(out, "table.md")) as f:
    print(f.read())
  print(f"wrote {', '.join(os.path.basename(p) for p in paths)} in {out}")


# Flags a worker of --workers does not inherit (it gets its own).
_PARENT_ONLY = ("workers", "shard", "progress", "tables", "merge")


def _worker_argv() -> list[str]:
  """The sweep's own flags as given, for its worker processes."""
  seen, argv = set(), []
  for name in FLAGS:
    flag = FLAGS[name]
    if flag.present and id(flag) not in seen and flag.name not in _PARENT_ONLY:
      seen.add(id(flag))
      argv.append(flag.serialize())
  return argv


def main(argv) -> None:
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; every option is a --flag")
  try:
    workdir.check(FLAGS.out)
    run_lib.require_workers(FLAGS.workers)
    run_lib.require_threads(FLAGS.threads)
    if FLAGS.workers > 1 and (FLAGS.shard or FLAGS.merge):
      raise ConfigError("workers: runs every shard on this machine; it "
                        "cannot be combined with --shard or --merge")
    if FLAGS.merge:
      paths = run_lib.merge(FLAGS.out)
    elif FLAGS.workers > 1:
      paths = run_lib.sweep_workers(_spec(), FLAGS.out, _worker_argv(),
                                    FLAGS.workers, progress=FLAGS.progress)
    else:
      paths = run_lib.sweep(_spec(), FLAGS.out,
                            shard=store.parse_shard(FLAGS.shard),
                            progress=FLAGS.progress, tables=FLAGS.tables,
                            threads=FLAGS.threads,
                            compilation_cache=None
                            if FLAGS.compilation_cache == "none"
                            else FLAGS.compilation_cache)
  except ConfigError as e:
    message = str(e).splitlines()[0]
    _fail(f"--{message}" if message.split(":")[0] in FLAGS else message)
  except run_lib.WorkerError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if paths:
    _show(FLAGS.out, paths)


def run() -> None:
  app.run(main, flags_parser=lambda argv: cli.parse_flags(
      argv, lambda m: _fail(m)))


if __name__ == "__main__":
  run()
