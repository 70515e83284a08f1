"""A mini-omni-compatible speech-to-speech HTTP server (see ``python -m omni_server --help``)."""

# The line `python -m omni_server` prints once its socket is bound; a launcher (omni_client.LocalServer) reads
# the server's URL from it. Defined here, where both sides import it cheaply, so they cannot drift apart.
LISTENING_PREFIX = "omni_server listening on "
