"""Diffusion schedulers, one per file, each with ``set_timesteps`` / ``scale_model_input`` / ``step``.

They work on numpy arrays and torch tensors alike (all per-step coefficients are Python floats).
"""
from engine.diffusion.schedulers.common import SchedulerConfig, StepOutput, make_scheduler, SAMPLERS

__all__ = ["SchedulerConfig", "StepOutput", "make_scheduler", "SAMPLERS"]
