"""Two-task gradient combiners and the GeN learning rate (filled in by the optimizer core)."""

__all__: list[str] = []
