"""vivace.registry."""
