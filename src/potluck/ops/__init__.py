"""Use cases, one wing (subpackage) per capability; each wing's ``__init__`` exposes what the CLI
and the git adapters call:

* ``vcs`` — the object database, snapshot (clean) and materialise (smudge), tensor diff, the
  three-way manifest merge, object push/fetch and the wire index;
* ``models`` — model sources (files, Hugging Face directories, ``file@rev``), the HF directory
  writer, torch/transformers data helpers;
* ``merge`` — mergekit-style merges: config, plan, run, card, statistics files and their torch
  computation;
* ``patch`` — the patch file format, create, apply, stack, check, eval, card, output;
* ``peft`` — PEFT adapters: reading, config, merge arithmetic, apply, import, export;
* ``compose`` — expert libraries, composition manifests and lockfiles, the torch runtime.

Wings import downwards only (``compose → peft → patch → models``, ``merge → models``; ``vcs``
imports no other wing), enforced by the import-linter contracts in ``pyproject.toml``.
"""
