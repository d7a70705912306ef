"""The options: ``schema`` (typed, frozen, checked dataclasses in the original PPAP JSON schema), ``families`` (the
backbone families' table), ``loader`` (option files, ``base`` files and command-line overrides into a ``Config``),
``overrides`` (the sweep grammar of ``run.py --multirun``)."""
from config.families import BACKBONE_WIDTH, BACKBONES, Family, Size
from config.loader import config_from_dict, config_to_dict, load_config
from config.schema import (DATA_TYPES, EVAL_RES, EVAL_SPLITS, EVALUATION_INPUT, FORMER_DEFAULTS, GATHER_PRECISIONS,
                           NO_EFFECT, NONE_WEIGHTS, TTA_MODES, WANDB_MODES, Config, DataloaderConfig, DatasetConfig, EvalConfig, ModelConfig,
                           OptimConfig, OptimizerConfig, PretrainedConfig, SelfTrainingConfig, TrainConfig, TrainingCoeff, WandbConfig,
                           option_keys)

__all__ = ["BACKBONE_WIDTH", "BACKBONES", "DATA_TYPES", "EVAL_RES", "EVAL_SPLITS", "EVALUATION_INPUT", "FORMER_DEFAULTS",
           "GATHER_PRECISIONS", "NO_EFFECT", "NONE_WEIGHTS", "TTA_MODES", "WANDB_MODES", "Config", "DataloaderConfig", "DatasetConfig",
           "EvalConfig", "Family", "ModelConfig", "OptimConfig", "OptimizerConfig", "PretrainedConfig", "SelfTrainingConfig", "Size",
           "TrainConfig", "TrainingCoeff", "WandbConfig", "config_from_dict", "config_to_dict", "load_config",
           "option_keys"]
