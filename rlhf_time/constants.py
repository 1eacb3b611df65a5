"""Constants shared by every layer (data, losses, stages)."""

# Label of positions that are not trained: prompts, padding, packing boundaries (Hugging Face's convention).
IGNORE_INDEX = -100

# The package version (pyproject.toml's); `rlhf_time.__version__` and `rlhf-time --version` read it from here.
VERSION = "0.1.0"
