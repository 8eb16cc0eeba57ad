"""How the compute runs: the device, glibc malloc settings, numeric precision, a CPU batch as two halves."""
