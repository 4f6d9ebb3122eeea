"""Training stages: pretrain, chat (midtrain + SFT), and the loop they share."""
