"""Evaluation: side-by-side timing, quality metrics, reports with plots, and the settings search.

    record = accel.eval.evaluate(pipe, ["tome=0.5", "deepcache=3"], prompts=prompts)
    result = accel.eval.tune(model, accel.eval.Budget("psnr", 30), measure, context={...})

Modules: ``evaluation`` (evaluate, sharded with accelerate), ``tuning`` (tune, Budget, candidates),
``quality`` (PSNR, SSIM, FID with a bootstrap interval), ``outputs`` (JSON, Markdown, plots, grid).
"""
from .evaluation import Judges, evaluate
from .tuning import Budget, NoSettingMeetsBudget, candidates, tune

__all__ = ["evaluate", "Judges", "tune", "Budget", "NoSettingMeetsBudget", "candidates"]
