"""mha-serve: the HTTP service around mha_core (FastAPI app, codecs, batcher, runner)."""

__version__ = "0.1.0"
