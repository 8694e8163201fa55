"""Where the embedded demo model lives: a small Qwen3-MoE trained by scripts/train_demo.py."""

from pathlib import Path


def demo_model_path() -> Path:
    """Return the folder of the demo checkpoint shipped inside the package (Hugging Face layout)."""
    return Path(__file__).resolve().parent.parent / "demo_model"
