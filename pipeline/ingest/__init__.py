"""Ingest: read the corpus, scan and plan it, send batches, watch progress, finalize. Imports services and
below; the CLI (``pipeline.cli``) is the only module above it."""
