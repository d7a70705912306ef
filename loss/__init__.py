"""The losses: PPAP's (ppap.py) and the probes' cross-entropy (probe.py)."""
from loss.ppap import Mining, PPAPLoss, PPAPResult, mine
from loss.probe import bilinear_weights, probe_cross_entropy, upsample

__all__ = ["Mining", "PPAPLoss", "PPAPResult", "bilinear_weights", "mine", "probe_cross_entropy", "upsample"]
