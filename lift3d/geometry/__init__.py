"""lift3d.geometry."""
