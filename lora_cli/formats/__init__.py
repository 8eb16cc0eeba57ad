"""Task-independent files: base checkpoints, the metadata schemas of the files lora-cli writes, run directories
and training checkpoints, and `lora-cli info`'s reader."""
