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

import dataclasses
import os
import sys

from absl import app, flags, logging

from jaxrep.protocol import loop as protocol
from jaxrep.core.errors import ConfigError

_DEFAULT = protocol.SimConfig()
FLAGS = flags.FLAGS

_HELP = {
    "dataset": "images: digits (embedded), idx, fashion_mnist_idx, or a TFDS "
               "name; text: fortunes (Debian's fortunes package), "
               "text_synthetic, or a TFDS text name (imdb_reviews, "
               "ag_news_subset, ...)",
    "data_dir": "directory of IDX files, of the fortunes files or of "
                "prepared TFDS data",
    "max_len": "text: tokens per example (longer ones are truncated)",
    "vocab_size": "text: vocabulary size, <pad> and <unk> included",
    "model": "auto (mlp for images, text_cnn for text), mlp, cnn, resnet20, "
             "text_cnn or text_transformer",
    "providers": "number of providers n (>= 2)",
    "malicious": "how many of them plant a backdoor",
    "attack": "auto (badnets for images, token for text); images: badnets, "
              "blend, label_flip, scaling or warp; text: token (rare-word "
              "trigger inserted at a random place), phrase (a phrase of "
              "common words inserted at the start) or label_flip",
    "poison_rate": "share of each batch a malicious provider poisons",
    "target_label": "backdoor target; -1: each malicious provider its own",
    "trigger_size": "images: BadNets / scaling patch size in pixels",
    "trigger_location": "top_left, top_right, bottom_left, bottom_right, "
                        "center or random (each provider its own)",
    "blend_alpha": "blend attack strength",
    "scale_factor": "model replacement factor of the scaling attack",
    "warp_strength": "warp attack displacement in pixels",
    "label_flip_source": "label_flip source class; -1: each provider its own",
    "trigger_tokens": "text: trigger length in tokens (0: token 1, phrase 4)",
    "steps": "training steps T of the whole run",
    "subrun_steps": "steps k per sub-run (steps must be a multiple)",
    "replicated": "sub-runs m the client replicates on all providers",
    "metric": "l2, cosine, l1, linf, output, cka or zest",
    "detector": "ks, zscore, krum, multikrum, median or cluster",
    "alpha": "significance level of the detector, in (0, 1)",
    "ks_margin": "ks: test whether a provider's distances exceed margin x "
                 "the others' (1: the plain test; see detect.py)",
    "krum_f": "f assumed by krum/multikrum; -1: (n - 3) // 2",
    "seed": "seed of everything (init, schedule, triggers, choices)",
    "batch_size": "examples per training step",
    "optimizer": "sgd (with momentum) or adam",
    "learning_rate": "peak learning rate",
    "momentum": "SGD momentum",
    "schedule": "constant, cosine, warmup_cosine or step",
    "permute": "benign divergence: per-provider reduction order",
    "grad_noise": "benign divergence: relative gradient noise scale",
    "bf16_fraction": "benign divergence: share of providers in bfloat16",
    "probe_size": "test examples used as the probe set of output/cka/zest",
    "max_train": "use only the first N training examples (0: all)",
    "hostile": "for testing the client's checks: providers returning garbage, "
               "e.g. '3:nan,5:wrong_shape' (modes nan, inf, diverged, "
               "wrong_shape)",
    "devices": "devices the providers are split over (1: one device, 0: all, "
               "e.g. 8 GPUs); providers must be a multiple",
    "memory_mb": "memory budget per device in MiB (0: what the device "
                 "reports); a population that does not fit is trained in "
                 "provider chunks, one that can never fit is refused",
    "attack_check": "also train every provider's own full run, to show each "
                    "attack works (ASR) — doubles the training cost",
}


def _define_flags() -> None:
  for field in dataclasses.fields(protocol.SimConfig):
    default = getattr(_DEFAULT, field.name)
    help_ = _HELP[field.name]
    if field.name == "data_dir":
      flags.DEFINE_string(field.name, None, help_)
    elif isinstance(default, bool):
      flags.DEFINE_bool(field.name, default, help_)
    elif isinstance(default, int):
      flags.DEFINE_integer(field.name, default, help_)
    elif isinstance(default, float):
      flags.DEFINE_float(field.name, default, help_)
    else:
      flags.DEFINE_string(field.name, default, help_)
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


def config_from_flags() -> protocol.SimConfig:
  values = {f.name: FLAGS[f.name].value
            for f in dataclasses.fields(protocol.SimConfig)}
  return protocol.SimConfig(**values)


def jax_process_count() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count()


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _parse(argv):
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0])


def main(argv) -> None:
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; every option is a --flag")
  from jaxrep.runtime import distributed
  from jaxrep.report import outputs as report
  try:
    config = config_from_flags().validate()
    multi = distributed.initialize(FLAGS.coordinator_address,
                                   FLAGS.num_processes, FLAGS.process_id)
    lead = distributed.is_coordinator()
    if lead:
      os.makedirs(FLAGS.out, exist_ok=True)
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
