"""The block server: ``lamina serve`` runs the NBD exports and the manager's HTTP app in
one process.

server.py    ``lamina serve``: one event loop for NBD and HTTP, startup and shutdown
catalog.py   the exports (IMAGE@V, machine/NAME, machine/NAME/seed) resolved per handshake
profile.py   boot recording: the order a booting machine first reads its image's chunks
"""
