"""lift3d.utils."""
