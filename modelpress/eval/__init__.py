"""Measuring: perplexity, size and bits per weight, decode speed."""
