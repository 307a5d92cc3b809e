"""File-tree layers: import, capture, compose with overlayfs, attach and detach live.

A layer version is a read-only file tree (``tree``), its file data in the chunk store
(dedup across layers and versions), its manifest one more object there. On a host, each
version is prepared once as an EROFS image and mounted once, file-backed, and that mount is
a lower layer of every overlay using it (``prepare``). A root is composed with one overlayfs
mount: read-only layers in priority order, a writable layer's last version, and the
session's upper directory (``runtime``, ``overlay``). At umount the upper directory,
filtered by the policy, becomes the writable layer's next version (``writable``).

Live attach and detach
----------------------
overlayfs cannot add or drop a layer of a mounted instance, so attach and detach build a
second overlay (the new layer list, the *same* upper directory, a new work directory),
move it beneath the mounted one at the root (``move_mount(MOVE_MOUNT_BENEATH)``, Linux 6.5)
and lazily detach the old one. Nothing is copied: the cost is two mount calls, whatever
the number of files (measured by ``bench/attach.py``).

- New path lookups through the root see the new layer set at once.
- A process with an open file, an open directory or its working directory inside the root
  keeps using the old overlay, which stays alive, detached, until the last such reference
  is gone. Files it had open stay open (a detached layer's files stay readable); relative
  lookups from its old working directory see the *old* layer set (a detached layer's files
  are still there, an attached one's are not) until it changes directory through the
  root's path again (``cd /same/path`` is enough).
- No write is lost: both overlays write into the one upper directory. Files the process
  already has open for writing were copied up when opened; files it creates go to the
  upper directory, where the new overlay finds them.
- Limits: (1) when the *same* lower-layer file is first modified through the new overlay
  and later through the old one (or the reverse), the second copy-up finds the upper file
  already there and fails with EEXIST instead of overwriting it: the late writer gets an
  error, the first write is kept. (2) a name the new overlay looked up and found missing
  may stay cached as missing if the old overlay creates it afterwards, until the dentry
  cache drops it; the file is in the upper directory and is kept at umount. (3) the kernel
  logs once that the upper directory is shared ("upperdir is in-use"). (4) ``umount``
  waits for every generation: it refuses while any process is inside any of them.

Safety: archive members are checked (``paths``, ``builder``) before anything is written;
device nodes and setuid/setgid files need ``--allow-devices`` / ``--allow-setuid``.
"""
