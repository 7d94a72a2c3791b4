"""Model packages and inference backends."""
