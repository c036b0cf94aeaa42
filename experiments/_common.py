"""What the experiment scripts share (a module, not a script).

Options are absl flags, as in the main job (`python -m jaxrep.simulate`):
`run(main)` starts a script (flags only, no positional arguments),
`define_list` defines a comma-separated list flag (`--seeds=0,1,2`) and
`script_args()` reads the script's own flags. `median_time` and `timed`
time calls; `subrun_inputs` gives the arguments of a Simulation's first
sub-run, as the protocol hands it to the providers.
"""

from __future__ import annotations

import statistics
import sys
import time
import types

import jax
from absl import app, flags, logging

from jaxrep import protocol

# The flags `define_list` defines belong to the script that calls it.
flags.disclaim_key_flags()


class _ListParser(flags.ListParser):
  """A comma-separated list of `kind` values, each one of `choices` if
  given."""

  def __init__(self, kind: type, choices=None):
    super().__init__()
    self.kind, self.choices = kind, choices

  def parse(self, argument):
    values = [self.kind(v) for v in super().parse(argument)]
    unknown = [v for v in values
               if self.choices is not None and v not in self.choices]
    if unknown:
      raise ValueError(f"unknown {', '.join(map(str, unknown))}; choose from "
                       f"{', '.join(map(str, self.choices))}")
    return values

  def flag_type(self) -> str:
    return f"comma separated list of {self.kind.__name__}"


def define_list(name: str, default, help: str, *, kind: type = str,
                choices=None) -> None:
  """A flag holding a comma-separated list, e.g. --seeds=0,1,2."""
  flags.DEFINE(_ListParser(kind, choices), name, default, help,
               serializer=flags.CsvListSerializer(","))


def script_args() -> types.SimpleNamespace:
  """The values of the running script's own flags, by name."""
  own = flags.FLAGS.get_key_flags_for_module(sys.argv[0])
  return types.SimpleNamespace(**{f.name: f.value for f in own})


def run(main) -> None:
  """Runs `main()` once the flags are parsed, logging warnings only, as the
  main job; a positional argument is a usage error."""
  def with_flags(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}; every option "
                           "is a --flag")
    main()
  app.run(with_flags)


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
  """Median wall time of `repeats` calls of fn() (fn blocks until done),
  and every time."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def timed(fn, repeats: int) -> float:
  """Median wall time of fn() over `repeats` calls after one warm-up call
  (which compiles), each waited for with `jax.block_until_ready`."""
  jax.block_until_ready(fn())
  return median_time(lambda: jax.block_until_ready(fn()), repeats)[0]


def subrun_inputs(sim, providers: int | None = None,
                  steps: int | None = None) -> tuple:
  """The arguments of `sim.trainer.sub_run` for the protocol's first sub-run:
  the initial checkpoint, batches, keys, divergence and behaviour of the
  first `providers` providers (default all n) over the first `steps` steps
  (default k)."""
  n = sim.n if providers is None else providers
  client = protocol.initial_state(sim).client
  pop = sim.trainer.replicate(client.params, client.model_state, n,
                              opt_state=client.opt_state)
  first = lambda tree: jax.tree_util.tree_map(lambda a: a[:n], tree)
  return (pop, sim.x_train, sim.y_train, sim.schedule(0)[:steps],
          first(sim.keys(0)), first(sim.divergence), first(sim.behaviour))
