"""Files in and out: Orbax model checkpoints, pictures."""
