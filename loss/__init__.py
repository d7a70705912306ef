"""The PPAP loss."""
from loss.ppap import Mining, PPAPLoss, PPAPResult, mine

__all__ = ["Mining", "PPAPLoss", "PPAPResult", "mine"]
