r"""The main job: simulate RTTD end to end.

    python -m jaxrep.simulate                      # digits, 16 providers, 8 malicious
    python -m jaxrep.simulate --dataset=fashion_mnist_idx --model=cnn \
        --providers=32 --malicious=16 --attack=blend --metric=cosine --out=runs/fm

Multi-host (e.g. a TPU slice, or two CPU hosts): start the same command on
every host with --coordinator_address=host0:port --num_processes=P
--process_id=i (or the JAXREP_* environment variables of
`jaxrep.runtime.distributed`) and --devices=0; the providers are split over the
devices of all hosts and process 0 writes the outputs.

Writes <out>/results.json (config, per-provider flags, scores, clean accuracy
and attack success rate, summary) and PNG plots (distance matrix, distance
histograms, ROC curve). Bad flags exit with status 2 and a one-line message
naming the flag, before any training starts.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

from jaxrep import cli
from jaxrep import report
from jaxrep import protocol
from jaxrep.core.errors import ConfigError
from jaxrep.runtime import distributed
from jaxrep.runtime import workdir

FLAGS = flags.FLAGS


def _define_flags() -> None:
  cli.define_config_flags()
  flags.DEFINE_string("out", "runs/latest", "output directory")
  flags.DEFINE_bool("progress", True, "show a progress bar over sub-runs")
  flags.DEFINE_bool("resume", True, "continue the run checkpointed in --out "
                    "(a killed run resumes where it stopped)")
  flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of "
                      "process 0 (else $JAXREP_COORDINATOR)")
  flags.DEFINE_integer("num_processes", None, "multi-host: number of "
                       "processes (else $JAXREP_NUM_PROCESSES)")
  flags.DEFINE_integer("process_id", None, "multi-host: this process's id "
                       "(else $JAXREP_PROCESS_ID)")


_define_flags()


config_from_flags = cli.config_from_flags


def jax_process_count() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count()


_fail = cli.fail


def _parse(argv):
  return cli.parse_flags(argv, lambda message: _fail(message))


def main(argv) -> None:
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; every option is a --flag")
  try:
    config = protocol.validate(config_from_flags())
    workdir.check(FLAGS.out)
    multi = distributed.initialize(FLAGS.coordinator_address,
                                   FLAGS.num_processes, FLAGS.process_id)
    lead = distributed.is_coordinator()
    if lead:
      _claim = workdir.Claim(FLAGS.out)  # held until the process exits
    # Multi-process runs are not checkpointed: orbax would need a directory
    # shared by all hosts.
    result = protocol.run(config, progress=FLAGS.progress and lead,
                          workdir=None if multi else FLAGS.out,
                          resume=FLAGS.resume)
  except ConfigError as e:
    message = str(e).splitlines()[0]
    _fail(f"--{message}" if message.split(":")[0] in FLAGS else message)
  if multi:
    result.notes.append(f"multi-host: {jax_process_count()} processes, "
                        "not checkpointed")
    distributed.shutdown()
    if not lead:
      return
  results = report.results_dict(result)
  paths = report.write_plots(result, FLAGS.out)
  report.write_json_atomic(os.path.join(FLAGS.out, "results.json"), results)
  print(report.summary_table(result))
  print(f"\nwrote {os.path.join(FLAGS.out, 'results.json')} and "
        f"{', '.join(os.path.basename(p) for p in paths)}")


def run() -> None:
  app.run(main, flags_parser=_parse)


if __name__ == "__main__":
  run()
