"""lora-cli: LoRA fine-tuning for from-scratch GPT models and GPT-2.

Importing this package is cheap on purpose (no torch): the CLI's `--help` must be instant.
"""

__version__ = "0.1.0"
