"""Wire formats <-> numpy arrays. No torch here."""
