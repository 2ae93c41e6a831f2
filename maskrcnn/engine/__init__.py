"""Training and inference loops: trainer, hooks, solver, dataset inference/evaluation, launch, speed transforms,
test-time augmentation."""
from .budget import BudgetHook
from .ema import EMAHook, ModelEMA
from .hooks import HookBase, LogHook, PeriodicCheckpointer
from .inference import evaluate_on_dataset, inference_on_dataset
from .launch import create_ddp_model, setup_distributed
from .solver import WarmupMultiStepLR, build_lr_scheduler, build_optimizer
from .speed import prepare_for_inference, prepare_for_training
from .trainer import NonFiniteLossError, Trainer
from .tta import TestTimeAugmentation, with_test_time_augmentation

__all__ = [
    "Trainer",
    "NonFiniteLossError",
    "HookBase",
    "LogHook",
    "PeriodicCheckpointer",
    "ModelEMA",
    "EMAHook",
    "BudgetHook",
    "build_optimizer",
    "build_lr_scheduler",
    "WarmupMultiStepLR",
    "inference_on_dataset",
    "evaluate_on_dataset",
    "setup_distributed",
    "create_ddp_model",
    "prepare_for_inference",
    "prepare_for_training",
    "TestTimeAugmentation",
    "with_test_time_augmentation",
]
