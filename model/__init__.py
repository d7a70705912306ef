"""The DINO ViT backbone, the PPAP network and its probes."""
from model.ppap import ClusterOutput, ClusterProbe, NetOutput, PPAPNet, build_model, dropout_mask

__all__ = ["ClusterOutput", "ClusterProbe", "NetOutput", "PPAPNet", "build_model", "dropout_mask"]
