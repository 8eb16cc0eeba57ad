"""YAML training recipes; installed as the package `lora_cli.configs` so the defaults ship with the tool."""
