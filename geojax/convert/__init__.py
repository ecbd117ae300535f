"""Weight converters between official PyTorch checkpoints (safetensors) and geojax models."""
