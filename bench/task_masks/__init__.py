"""bench.task_masks: sizes and times of merges with per-task parts (tall_masks, emr)."""
