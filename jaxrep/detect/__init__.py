"""Detection: evidence pooled over replicated sub-runs, the detectors, and
the detection metrics (TPR, FPR, AUROC)."""

from jaxrep.detect.detectors import (DETECTORS, Evidence, Verdict, detect,
                                     median_distances, replica_ratios)
from jaxrep.detect.metrics import auroc, fpr, roc_curve, tpr
from jaxrep.detect.inspection import (Inspection, MaxMarginConfig,
                                      NeuralCleanseConfig, StripConfig,
                                      max_margin, neural_cleanse, strip,
                                      strip_entropies, strip_separation)
