"""weighted_pool: its fast paths (torch_impl: vectorized torch)."""
