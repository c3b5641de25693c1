"""lift3d.data."""
