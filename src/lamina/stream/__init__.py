"""Streaming (OnDemand): a local NBD endpoint that serves an image before it is copied.

index.py      which chunks the local cache holds (pure; on-disk format LMSI)
schedule.py   background hydration order: boot profile first, then the rest (pure)
rate.py       token bucket for --rate, backoff for retries (pure)
stack.py      the local delta stack (synced, sealed, active) and its sync state
cache.py      the cache directory: config, manifest, data file, index (I/O)
remote.py     the manager over HTTP: manifests, chunks, profiles, delta uploads
fetch.py      chunks into the cache on the event loop: reads that miss, prefetch
hydrate.py    background hydration workers, each with its own connection
device.py     the BlockDevice the endpoint serves, reading through the cache
endpoint.py   ``lamina stream``: NBD server, hydration, status, control socket
sync.py       ``lamina stream sync``: upload the sealed delta, merge, clear
fuse.py       the FUSE protocol for one read-only file (pure)
layerfile.py  a layer's EROFS image as a FUSE file whose chunks come on first read

The delta format and blobs it shares with the block server are in ``lamina.delta``; the
manager's side of a sync is ``lamina.delta.uploads``.
"""
