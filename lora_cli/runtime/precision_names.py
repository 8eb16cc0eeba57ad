"""The names of the `--precision` and `--base-dtype` choices, torch-free.

The recipe declares its options with them (and `lora-cli --help` imports no torch); `precision` maps them to
torch dtypes and autocast.
"""

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BASE_DTYPES = ("float32", "bfloat16", "float16")
