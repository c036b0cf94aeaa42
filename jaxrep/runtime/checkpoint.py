"""Checkpoints of a simulation in its work directory (orbax-checkpoint).

After every sub-run the protocol saves its whole state: the client's model,
the no-defense chain, the providers' own chains, who is trusted, the detector
evidence and progress. orbax writes each checkpoint into a temporary directory
and renames it when complete, so a process killed at any point leaves either
the previous checkpoint or the new one, never a half-written one. The config
is saved beside the state; resuming with a different config is an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxrep.core.errors import ConfigError

KEEP = 2


def _manager(workdir: str) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=KEEP,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir),
                                            "checkpoints"), options=options)


def config_dict(config) -> dict:
  flat = config.flat() if hasattr(config, "flat") else dataclasses.asdict(config)
  return json.loads(json.dumps(flat))


class Checkpointer:
  """Saves and restores the protocol state of one work directory."""

  def __init__(self, workdir: str, config):
    self.workdir = workdir
    self.config = config_dict(config)
    self._mngr = _manager(workdir)

  def latest(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    meta = dict(meta, config=self.config)
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    self._mngr.wait_until_finished()

  def restore(self, template: Any) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the latest checkpoint, or None if there is none.

    Raises:
      ConfigError: the checkpoint belongs to a run with another config.
    """
    step = self._mngr.latest_step()
    if step is None:
      return None
    meta = self._mngr.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]
    if meta.get("config") != self.config:
      saved = meta.get("config", {})
      diff = sorted(k for k in set(saved) | set(self.config)
                    if saved.get(k) != self.config.get(k))
      raise ConfigError(
          f"out: {self.workdir} holds a checkpoint of a run with another "
          f"config (differs in: {', '.join(diff)}); use another --out, or "
          "--noresume to start over")
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                      template)
    state = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
    return step, state, meta

  def close(self) -> None:
    self._mngr.close()
