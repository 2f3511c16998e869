"""The cache fusor: token selection, layer-wise loading, and the fused layer loop."""
