"""lift3d.guidance."""
