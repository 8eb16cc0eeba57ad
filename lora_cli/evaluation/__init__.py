"""Batched inference and the metrics of classification, and temperature calibration."""
