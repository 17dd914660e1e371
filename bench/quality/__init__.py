"""Merge quality on a real model: the communal workflow end to end (issue 7).

Base: all-MiniLM-L6-v2 (``bench.common``). Five contributors each fine-tune the encoder (plus
their own linear head) on one task, commit it on their own branch of a potluck git repository
and publish Fisher / Gram statistics computed on their own training data. The encoders are then
merged with every method potluck has (hyper-parameters picked on validation data only), one
merge is made with plain ``git merge`` through potluck's merge driver, every fine-tune is shipped
as lossy patches, and every result is recorded on its commit with ``potluck eval record``.

Run: ``.venv/bin/python -m bench.quality`` (see ``docs/results.md``).
"""
