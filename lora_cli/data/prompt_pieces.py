"""The pieces a formatted prompt is made of: text, and control tokens encoded as their ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class Special:
    """A chat format's control token (`<|eot_id|>`): encoded as its id, never as text, so a message that
    spells one stays ordinary text."""

    token: str


Piece = Union[str, Special]
