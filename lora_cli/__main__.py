"""`python -m lora_cli` runs the CLI."""

from lora_cli.cli import main

if __name__ == "__main__":
    main()
