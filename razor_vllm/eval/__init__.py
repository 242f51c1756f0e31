"""Long-context evaluation: synthetic retrieval tasks and a natural-text corpus."""
