"""Model analysis: FLOPs counting and latency/memory benchmarks."""
