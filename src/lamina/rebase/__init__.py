"""Rebase: re-apply a writable layer's changes on a patched base (smart template/delta).

A writable-layer version is a set of file-level changes against the read-only layers it
was made on (``lamina.layer.writable``). When the admin patches one of those layers, each
user's changes are carried onto the new version by a 3-way merge, path by path: old base,
new base, the user's changes (``merge``), with a per-path rule table (``policy``) and a
line-level merge for text (``diff3``). The pure parts do no I/O; ``run`` reads trees from
the store, writes the result as the layer's next version and rebases many layers at once.
"""
