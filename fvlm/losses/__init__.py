"""Loss modules (networks never compute losses) and the pure math behind them."""
from .calibration import (STATUS_ABNORMAL, STATUS_CODES, STATUS_NORMAL, STATUS_NOT_MENTIONED, CalibrationRule,
                          PairContext, create_calibration, list_calibrations, register_calibration)
from .contrastive import FineGrainedContrastiveLoss, LossConfig, build_loss
from .gather import gather_nograd, gather_with_grad, world_info
from .targets import combine_pair_weights, sigmoid_pair_loss, soft_infonce, soft_targets

__all__ = ["STATUS_ABNORMAL", "STATUS_CODES", "STATUS_NORMAL", "STATUS_NOT_MENTIONED", "CalibrationRule",
           "PairContext", "create_calibration", "list_calibrations", "register_calibration",
           "FineGrainedContrastiveLoss", "LossConfig", "build_loss", "gather_nograd", "gather_with_grad",
           "world_info", "combine_pair_weights", "sigmoid_pair_loss", "soft_infonce", "soft_targets"]
