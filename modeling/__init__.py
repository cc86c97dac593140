"""modeling layer (see DESIGN.md §2)."""
