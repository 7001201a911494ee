"""Long-document corpora for longtune: readers, tokenization, packing into rows with document
boundaries, and the embedded default corpus that needs no download."""
