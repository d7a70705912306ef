"""The loops: training (run.py) and evaluation (eval.py and validation during training)."""
