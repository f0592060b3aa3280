"""vivace.engine."""
