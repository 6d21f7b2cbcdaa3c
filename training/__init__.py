"""How the shipped denoiser is trained: scenes, network, loop, export (torch, the `train` extra)."""
