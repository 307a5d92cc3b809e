"""The block server: ``lamina serve`` runs the manager's HTTP app and the NBD exports, the
NBD connections in worker processes (one per core).

server.py       ``lamina serve``: startup and shutdown of the manager and the block server
options.py      what ``lamina serve`` is asked to do, and what NBD clients may cost it
workers.py      NBD worker processes: fed connections by the parent (connections per client
                address counted there), replaced if they die
channel.py      the parent-worker channel: pickled tuples with a descriptor, in pieces
handshake.py    one serving process: handshakes, opening exports off the loop, hand-overs
fastpath.py     the transmission phase of a plain connection on its raw socket, bounded as
                the handshake's path is (nbd.limits)
fastbounds.py   what a fast connection may hold, and its stall and idle timers
fastsend.py     a fast connection's replies: one sendmsg a batch, the rest kept for later
shared.py       what a process's fast connections share: the writer thread, the pool
pagecache.py    whether a write would only copy into the page cache (applied on the loop)
meter.py        what a process counts for /metrics: bytes and requests per export, errors
catalog.py      the exports (IMAGE@V, machine/NAME, machine/NAME/seed) resolved per handshake
records.py      what serving asks of the database: a worker asks its parent (no SQLAlchemy)
filedevices.py  the exports' devices as ranges of files (what the fast path reads)
imagefiles.py   an image version as files shared by every process: packs, a hydrated cache
profile.py      boot recording: the order a booting machine first reads its image's chunks
warmup.py       a version's boot set made ready from its profile when a process opens it
access.py       which exports a TLS client may open, by the credential it showed
control.py      the control socket: deltas copied at flush points for ``lamina backup``
tls.py          TLS for ``lamina serve``: the server certificate, NBD and HTTPS settings
cluster.py      a block server among several: its row in the database, its heartbeat
"""
