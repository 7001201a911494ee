"""Long-context evaluation of an HF model dir: passkey retrieval, needle in a haystack and perplexity
against evaluation length, reported as JSON, a Markdown table and PNG plots (`longtune eval`)."""
