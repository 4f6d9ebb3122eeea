"""Data: text sources (FineWeb-Edu shards, local folders, the offline corpus) and the loader."""
