"""Long-running work over collections: bulk ingest (resumable and distributed in later issues)."""
