"""lift3d.priors.toyworld."""
