"""Baseline servers the benchmark runs beside the reference service, same endpoints each."""
