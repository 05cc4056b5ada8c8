"""Models: checkpoints in (validated), the embedded default model, architecture
adapters, and inspection of what a checkpoint holds."""
