"""Pretrained weights from Hugging Face: GPT-2 downloads, Hub downloads of the other families, conversion of a
local Hugging Face checkpoint to a base checkpoint."""
