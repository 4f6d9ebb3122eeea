"""`nanochat serve`: a web chat UI and an OpenAI-compatible HTTP API over a trained model."""
