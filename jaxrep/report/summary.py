"""The short human-readable summary the main job prints."""

from __future__ import annotations

import math


def _fmt(v, pct=False):
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "n/a"
  return f"{100 * v:.1f} %" if pct else f"{v}"


def summary_table(result) -> str:
  """A short human-readable summary."""
  s = result.summary()
  cfg = result.config
  lines = [
      f"jaxrep: {cfg.providers} providers ({cfg.malicious} malicious, "
      f"{cfg.attack.name}), {cfg.dataset}/{cfg.model.name}, {cfg.steps} steps in "
      f"sub-runs of {cfg.subrun_steps}, {cfg.replicated} replicated, "
      f"{cfg.metric} + {cfg.detector.name} (alpha {cfg.alpha})",
      "",
      f"  detection     TPR {_fmt(s['tpr'], True):>8}   FPR "
      f"{_fmt(s['fpr'], True):>8}   AUROC {_fmt(round(s['auroc'], 4) if s['auroc'] == s['auroc'] else None)}",
      f"  providers     benign clean acc {_fmt(s['benign_mean_clean_accuracy'], True)}"
      f"   malicious clean acc {_fmt(s['malicious_mean_clean_accuracy'], True)}"
      f"   malicious ASR {_fmt(s['malicious_mean_attack_success_rate'], True)}",
      f"  client model  with RTTD: clean acc {_fmt(s['final_clean_accuracy'], True)}, "
      f"ASR {_fmt(s['final_attack_success_rate'], True)}"
      f"   |   no defense: clean acc {_fmt(s['no_defense_clean_accuracy'], True)}, "
      f"ASR {_fmt(s['no_defense_attack_success_rate'], True)}",
      f"  cost          {s['overhead_steps']} extra training steps on top of "
      f"{s['training_steps']}: {s['overhead_replication_steps']} replicating "
      f"(k*(trusted-1) per check), {s['overhead_reexecution_steps']} "
      f"re-executing after {s['rollbacks']} rollback(s); wall "
      f"{s['wall_seconds']:.1f} s",
  ]
  for note in result.notes:
    lines.append(f"  note: {note}")
  return "\n".join(lines)
