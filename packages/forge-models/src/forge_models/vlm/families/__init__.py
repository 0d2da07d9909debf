"""Vision-language model families with Hugging Face counterparts (registered in the model
registry beside the text families)."""
