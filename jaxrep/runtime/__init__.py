"""Runtime: where and how the computation runs.

  mesh.py         the provider axis as a mesh axis: mesh, placement, the
                  provider-sharded sub-run, collective counting
  memory.py       memory model of a sub-run, provider-chunk planning
  distributed.py  multi-host start-up (`jax.distributed`)
  checkpoint.py   checkpoints of a simulation (orbax)
  workdir.py      the work directory: checked, and held by one live run

Runtime imports only `jaxrep.core`: the stages above it (data, models,
train, distances ...) hand it what it needs (trainers, byte counts).
"""
