"""HTTP routers of the manager, one module per area.

admin.py    the admin API (admin token): users, groups, entitlements, machines, images, layers
boot.py     network boot (no token): iPXE scripts by MAC, kernels, initrds, credentials
agent.py    the agent API (machine tokens) and layer-data uploads
data.py     manifests and chunks, immutable and cacheable
layer_images.py  layer versions as EROFS images (built on demand), read-ahead profiles
stream.py   what stream endpoints need beyond data.py: geometry, profiles, deltas, uploads
"""
