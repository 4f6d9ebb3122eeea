"""Evaluation: bits per byte, the training stages' quick probes, CORE, chat tasks (ChatCORE), and
`nanochat eval`."""
