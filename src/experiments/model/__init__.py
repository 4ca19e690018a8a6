"""The model: backbones, heads, augmentation layers, and the compiled forward pass."""
