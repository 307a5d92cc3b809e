"""File-tree layers: import, capture, mount a composed root, attach and detach live.

A layer version is a read-only file tree, its file data in the chunk store (dedup across
layers and versions), its manifest one more object there. On a host, each version is
prepared once as an EROFS image and mounted once, file-backed, and that mount is a lower
layer of every overlay using it. A root is composed with one overlayfs mount: read-only
layers in priority order, a writable layer's last version, and the root's upper directory
(its changes). At umount the upper directory, filtered by the policy, becomes the writable
layer's next version. The database is reached through ``records.LayerRecords``, which the
caller passes in.

tree.py         a layer version as a file tree and its manifest (pure)
paths.py        path safety for archive members and links (pure)
builder.py      a tree from archive members, as tar and OCI apply them; Permits (pure)
sources.py      where a tree's members come from: directories, tars (LayerSource)
oci.py          OCI image layouts and ``docker save`` archives as sources
unpack.py       a compressed image archive unpacked to a folder, within bounds
importer.py     ``layer import``: scan everything, then store files and manifest
materialize.py  write a tree out as real files (``layer export``, mkfs.erofs input)
prepare.py      each version made an EROFS image and mounted once per host
erofs.py        a version's image built once, deterministically, and stored chunked
conflicts.py    app layers providing one path with different content (fingerprints)
changes.py      what a writable layer keeps: policies, merges, pruning, diffs (pure)
records.py      what the layer code needs of the database: values and the LayerRecords Protocol
roots.py        mount a composed root, umount it, list and release what is mounted
attach.py       live attach and detach on a mounted root
overlay.py      the overlay mounts themselves: compose, switch beneath, find users
mountapi.py     Linux's mount API through ctypes
loop.py         loop devices set up directly (EROFS images on kernels without file-backed mounts)
writable.py     keep a root's changes as the writable layer's next version
capture.py      ``layer capture``: run an installer on some layers, keep what it changed
sandbox.py      the capture sandbox (``python -m lamina.layer.sandbox``)

Safety: archive members are checked (``paths``, ``builder``) before anything is written;
device nodes and setuid/setgid files need ``--allow-devices`` / ``--allow-setuid``.
"""
