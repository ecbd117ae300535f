"""Diffusion and flow-matching utilities shared by generative geometry models."""
