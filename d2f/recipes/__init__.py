"""Peer training recipes as d2f objectives: one module a recipe, registered in `d2f.objectives`."""
