"""lift3d.systems."""
