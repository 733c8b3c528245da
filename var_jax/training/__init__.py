"""Training: the shared loop, the VAR and tokenizer tasks, optimizer, run configs."""
