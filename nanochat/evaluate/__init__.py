"""Evaluation: bits per byte, CORE, chat tasks."""
