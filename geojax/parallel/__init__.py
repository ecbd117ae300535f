"""Meshes, logical axis rules and sharded model creation."""
