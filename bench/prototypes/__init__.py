"""Worker prototypes measured by bench/throughput.py (copies; streams/ stays untouched)."""
