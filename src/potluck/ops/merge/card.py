"""What a merged model directory says about itself: its model card and its ``config.json``.

The card (``README.md``) has Hugging Face metadata (``base_model`` = the inputs,
``base_model_relation: merge``, ``tags``) and records the method, its paper, every input with
where it came from (path, git commit) and the configuration, so the weights' history is readable
without potluck.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from potluck.ops.lineage import Edge, card_lines, plan_edge
from potluck.ops.merge.config import MergeConfig
from potluck.ops.merge.plan import MergePlan
from potluck.ops.models.sources import ModelSource

__all__ = ["config_json", "merge_edge", "model_card"]

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _yaml_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def model_card(
    config: MergeConfig,
    plan: MergePlan,
    sources: Mapping[str, ModelSource],
    config_text: str | None,
    edge: Edge | None = None,
) -> str:
    """The README.md of a merged model (see the module docstring); ``edge`` (``merge_edge``)
    pins the inputs by weights digest in the front matter."""
    refs = config.referenced_models()
    lines = ["---", "base_model:"]
    lines += [f"- {_yaml_str(r)}" for r in refs]
    lines += ["base_model_relation: merge", "tags:", "- potluck", "- merge"]
    lines += [*(card_lines(edge) if edge is not None else []), "---", ""]
    title = config.name or "Merged model"
    method = plan.method
    lines += [
        f"# {title}",
        "",
        f"Made with potluck's `{method.name}` merge ({method.reference_url}): {method.description}",
        "",
        "## Inputs",
        "",
        "| role | model | source |",
        "| --- | --- | --- |",
    ]
    for ref in refs:
        role = "base" if ref == config.base_model else "model"
        ident = ", ".join(
            f"{k}={v}" for k, v in sorted(sources[ref].identity.items()) if k != "path"
        )
        lines.append(f"| {role} | `{ref}` | {ident or 'file'} |")
    lines += ["", f"Seed: {config.seed} (keys the random methods per model and tensor).", ""]
    if plan.notes:
        lines += ["## Notes", "", *(f"- {note}" for note in plan.notes), ""]
    if config_text is not None:
        lines += ["## Configuration", "", "```yaml", config_text.rstrip(), "```", ""]
    return "\n".join(lines)


def merge_edge(config: MergeConfig, plan: MergePlan, sources: Mapping[str, ModelSource]) -> Edge:
    """The lineage edge of a merge output: every input pinned by digest (base first), the
    method, its parameters and the seed."""
    refs = config.referenced_models()
    params = {"seed": config.seed, "parameters": _settings(config.parameters)}
    return plan_edge([sources[r] for r in refs], "merge", plan.method.name, params, refs)


def _settings(value: object) -> object:
    if isinstance(value, Mapping):
        return {str(k): _settings(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_settings(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def config_json(config_dir: Path | None, plan: MergePlan, config: MergeConfig) -> str | None:
    """The base's ``config.json`` with the layer count and dtype of the merged model."""
    if config_dir is None or not (config_dir / "config.json").is_file():
        return None
    data = json.loads((config_dir / "config.json").read_text())
    if plan.num_layers is not None:
        for key in _LAYER_KEYS:
            if key in data:
                data[key] = plan.num_layers
    dtypes = {j.out.dtype for j in plan.jobs}
    if len(dtypes) == 1:
        name = _DTYPE_NAMES.get(dtypes.pop())
        if name is not None:
            for key in ("torch_dtype", "dtype"):
                if key in data:
                    data[key] = name
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
