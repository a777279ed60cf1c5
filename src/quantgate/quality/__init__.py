"""Image and output fidelity against a reference: metrics, the golden image store, sample grids."""
