"""lift3d.renderers."""
