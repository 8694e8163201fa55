"""Where the bundled demo MoE lives: inside the package, so an installed wheel finds it without network."""

from pathlib import Path


def demo_model_path() -> Path:
    return Path(__file__).resolve().parent.parent / "demo_model"
