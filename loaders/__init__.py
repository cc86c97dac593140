"""loaders layer (see DESIGN.md §2)."""
