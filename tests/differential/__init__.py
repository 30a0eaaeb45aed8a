"""Differential tests: ``ratebp_compile.transform`` against an independent eager reference of the
semantics contract, on randomly generated spiking networks."""
