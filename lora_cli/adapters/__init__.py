"""Adapter files, which carry a task's head and labels: lora-cli's adapter, PEFT directories, merging an
adapter into its base."""
