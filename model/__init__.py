"""Model: Llama-family decoder, weight loading (GGUF, Hugging Face, synthetic), tokenizer, sampler."""
