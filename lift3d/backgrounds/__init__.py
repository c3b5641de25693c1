"""lift3d.backgrounds."""
