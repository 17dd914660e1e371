"""Merging whole models (mergekit-style): YAML config, per-tensor plan, streamed run, model card,
statistics files for data-aware methods and their torch computation (``stats_torch``, imported
on demand)."""

from potluck.ops.merge.config import MergeConfig, add_exclusions, load_config, parse_config
from potluck.ops.merge.plan import MergePlan
from potluck.ops.merge.run import explain_merge, run_merge
from potluck.ops.merge.statsfile import StatsFile, check_stats_files, load_stats, write_stats

__all__ = [
    "MergeConfig",
    "MergePlan",
    "StatsFile",
    "add_exclusions",
    "check_stats_files",
    "explain_merge",
    "load_config",
    "load_stats",
    "parse_config",
    "run_merge",
    "write_stats",
]
