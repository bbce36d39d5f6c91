"""hftk: one YAML recipe, one command, a fine-tuned and evaluated Hugging Face model."""

__version__ = "0.1.0"
