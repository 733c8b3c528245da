"""Files: checkpoints, official PyTorch state dicts, the overwrite rule for outputs."""
