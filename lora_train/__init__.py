"""LoRA Train: a kohya-compatible LoRA trainer that runs inside the A1111 WebUI or headless."""

__version__ = "0.1.0"
