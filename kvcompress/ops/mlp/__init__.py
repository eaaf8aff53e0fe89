"""mlp: its fast paths (torch_impl: vectorized torch)."""
