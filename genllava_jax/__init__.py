"""GenLLaVA in pure JAX."""
