"""samplers layer (see DESIGN.md §2)."""
