"""The `lora-cli` command line (`commands`) and its human-readable output: tables and plots.

Nothing here is imported by the library below it; importing this package imports nothing.
"""
