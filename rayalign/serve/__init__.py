"""Serving a trained Aligner: an in-process engine and the Ray Serve application."""
