"""Vector indexes and storage: flat exact scan today, the SPANN-like index next."""
