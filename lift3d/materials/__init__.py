"""lift3d.materials."""
