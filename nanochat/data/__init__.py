"""Data: text sources (FineWeb-Edu shards, local folders, the offline corpus), the pretraining
loader, the chat stages' batches and the CORE eval bundle. Imports neither evaluate nor train."""
