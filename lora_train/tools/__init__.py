"""Tools for finished LoRA files: inspect (and, next, resize, block-weight bake, merge / subtract, extract)."""
