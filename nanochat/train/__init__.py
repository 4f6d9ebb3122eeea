"""Training stages: pretrain, chat (midtrain + SFT) and the tokenizer's training, with the stage loop
they share (loop.py). Nothing outside the commands imports this package: inference loads models
through nanochat.runs."""
