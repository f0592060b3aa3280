"""vivace.features."""
