"""A mini-omni-compatible speech-to-speech HTTP server (see ``python -m omni_server --help``)."""
