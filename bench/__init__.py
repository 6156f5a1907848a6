"""exod benchmarks. Each prints one JSON object: python -m bench NAME."""
