"""One trial: the Ray Train worker loop and the Tune function that drives it (imports spec/, data/, models/, evaluation/)."""
