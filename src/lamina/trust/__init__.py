"""Trust: the home's certificate authority and what a TLS client proves.

authority   the CA kept in HOME/tls; server certificates naming every address served;
            client credentials (machine, admin) under qemu's file names
principal   who a client certificate names (pure; the database decides if it still holds)
contexts    the ssl contexts: the server's (NBD and HTTPS), the HTTP clients' (--ca)
files       the file names of the CA and of the credentials (qemu's)
addresses   the names and addresses a server certificate must carry

What each credential opens is decided where the exports are (``serve.access``); the
credentials issued and rotated are recorded by ``manager.services.credentials``.
"""
