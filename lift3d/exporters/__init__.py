"""lift3d.exporters."""
