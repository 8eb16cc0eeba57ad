"""The library's front door: `Classifier` (inference) and `train`, which the CLI, a server and Python users call."""
