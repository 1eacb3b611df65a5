"""Constants shared by every layer (data, losses, stages)."""

# Label of positions that are not trained: prompts, padding, packing boundaries (Hugging Face's convention).
IGNORE_INDEX = -100
