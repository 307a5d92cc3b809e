"""Rebase: re-apply a writable layer's changes on a patched base (smart template/delta).

A writable-layer version is a set of file-level changes against the read-only layers it
was made on (``lamina.layer.writable``). When the admin patches one of those layers, each
user's changes are carried onto the new version by a 3-way merge, path by path: old base,
new base, the user's changes, with a per-path rule table and a line-level merge for text.
The pure parts do no I/O; ``run`` reads trees from the store, writes the result as the
layer's next version and rebases many layers at once.

views.py    what a stack of read-only layers shows, what changed between two stacks (pure)
rules.py    the rule table: glob -> rule, first match wins (``lamina rebase policy``)
merge.py    the path-by-path 3-way merge (pure)
meta.py     entry metadata merged field by field (pure)
diff3.py    line-level 3-way merge of text (pure)
report.py   what a rebase did, path by path (pure)
jobs.py     what a rebase needs of the database: Job, Skipped, the RebaseRecords Protocol
run.py      rebase for real: one layer, or many in worker processes
"""
