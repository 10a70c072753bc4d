"""Benchmarks and experiments (passkey, perplexity, needles) built on the public API."""
