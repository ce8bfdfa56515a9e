"""Telemetry: what a run records about itself (metrics, events) and how it shows progress."""
