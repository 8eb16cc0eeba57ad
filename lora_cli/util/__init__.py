"""Generic utilities, below everything else and free of torch: the error type, atomic file writes, the
schema reader of untrusted data, HTTP downloads. Imports nothing of lora_cli but `lora_cli.__version__`.

The subpackages are layers, each importing only from itself and the ones below it: `LAYERS` in
tests/test_layout.py declares their order.
"""
