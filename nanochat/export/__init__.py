"""`nanochat export`: a trained model in the formats the ecosystem's tools start from (a Hugging
Face transformers directory, a GGUF file for llama.cpp). Imports nothing from training."""
