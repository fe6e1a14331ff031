"""Model references, lazy checkpoint reading, LoRA task vectors, loading and saving."""
