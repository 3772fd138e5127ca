"""The MLX backend (Apple Silicon GPU; CPU anywhere mlx installs)."""
