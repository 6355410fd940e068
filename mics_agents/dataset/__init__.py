"""MMRP-style dataset building: quality control of MICS output, image-text alignment pairs, the
three-stage curriculum, exports for training frameworks, step-reward rows and step preference pairs from
the search trees, and a stats report."""

from .build import BuildOptions, BuildReport, build_dataset
from .curriculum import Recipe, default_recipe, load_recipe
from .qc import QcOptions, quality_control
from .samples import Sample
from .steps import StepOptions, StepStats, read_step_records, write_steps

__all__ = [
    "BuildOptions",
    "BuildReport",
    "QcOptions",
    "Recipe",
    "Sample",
    "StepOptions",
    "StepStats",
    "build_dataset",
    "default_recipe",
    "load_recipe",
    "quality_control",
    "read_step_records",
    "write_steps",
]
