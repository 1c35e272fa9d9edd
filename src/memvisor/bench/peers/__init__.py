"""Peer memory systems run side by side with memvisor in the benchmarks (optional extras)."""
