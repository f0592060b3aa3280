"""vivace.bench."""
