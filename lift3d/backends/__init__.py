"""lift3d.backends."""
