"""The block server: ``lamina serve`` runs the NBD exports and the manager's HTTP app in
one process.

server.py    ``lamina serve``: one event loop for NBD and HTTP, startup and shutdown
catalog.py   the exports (IMAGE@V, machine/NAME, machine/NAME/seed) resolved per handshake
profile.py   boot recording: the order a booting machine first reads its image's chunks
access.py    which exports a TLS client may open, by the credential it showed
tls.py       TLS for ``lamina serve``: the server certificate, NBD and HTTPS settings
"""
