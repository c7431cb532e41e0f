"""`make demo`: a small fleet on this machine, with its own broker, watched live, then summarised."""
