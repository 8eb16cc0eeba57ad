"""`python -m lora_cli` runs the CLI."""

from lora_cli.cli.commands import main

if __name__ == "__main__":
    main()
