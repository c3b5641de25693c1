"""lift3d.priors."""
