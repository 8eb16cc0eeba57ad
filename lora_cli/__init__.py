"""lora-cli: LoRA fine-tuning for from-scratch GPT models and GPT-2.

The front door for Python users: `from lora_cli import Classifier, Generator, train` (lora_cli/api). Importing this
package is cheap on purpose (no torch): the CLI's `--help` must be instant, so the front door loads on first use.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Classifier", "Generator", "train", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Classifier":
        from lora_cli.api.classifier import Classifier

        return Classifier
    if name == "Generator":
        from lora_cli.api.generator import Generator

        return Generator
    if name == "train":
        from lora_cli.api.training import train

        return train
    raise AttributeError(f"module 'lora_cli' has no attribute {name!r}")
