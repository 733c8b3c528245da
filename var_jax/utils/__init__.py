"""Small shared helpers: the command-line wrapper, metric writers, image grids."""
