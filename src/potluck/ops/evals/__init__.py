"""Evaluation records tied to exact weights, the merge gate and reports (issue 17)."""
