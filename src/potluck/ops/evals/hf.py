"""Built-in suite loaders for Hugging Face models (torch + transformers, offline).

``potluck.ops.evals.hf:sequence_classifier``: an ``AutoModelForSequenceClassification`` and its
tokenizer from the model directory; each item's ``prompt`` (when the task has a template) or
``text`` is classified and the predicted label id is compared with the item's ``label``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from potluck.errors import UserError
from potluck.ops.models.torchdata import load_pretrained, require_torch


def sequence_classifier(model_dir: Path) -> Any:
    """``predict(items)`` → the argmax label id of each item's text."""
    require_torch("the sequence_classifier loader")
    import torch
    from transformers import AutoTokenizer

    model, missing = load_pretrained("AutoModelForSequenceClassification", model_dir)
    if model is None or missing:
        raise UserError(
            f"{model_dir}: not a complete sequence classifier"
            + (f" (missing {', '.join(missing[:3])})" if missing else ""),
            hint="a classifier's head must be in the checkpoint; a random head is no result",
        )
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model.eval()

    def predict(items: list[dict[str, Any]]) -> list[int]:
        texts = [str(it.get("prompt", it.get("text", ""))) for it in items]
        enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits
        return [int(x) for x in logits.argmax(-1).tolist()]

    return predict
