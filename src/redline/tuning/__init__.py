"""Deciding by measurement: `redline tune`, the batch search, trials."""
