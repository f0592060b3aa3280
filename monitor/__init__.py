"""vivace.monitor."""
