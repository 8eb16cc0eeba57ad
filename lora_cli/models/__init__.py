"""The architectures lora-cli fine-tunes: the family registry, the GPT-2 GPTModel and its config, the decoder
Llama 3 and Qwen3 share, and each family's Hugging Face key and config mappings."""
