"""The benchmark suite of herdserver: see bench/README.md."""
