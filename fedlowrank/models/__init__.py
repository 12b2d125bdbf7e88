"""Model definitions (dense); factorize them with fedlowrank.lowrank.factorize."""
