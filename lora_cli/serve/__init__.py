"""`lora-cli serve`: many classification adapters on one base model, over vLLM's pooling API."""
