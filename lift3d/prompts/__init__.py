"""lift3d.prompts."""
