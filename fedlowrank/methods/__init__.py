"""Methods acting on factorized layers: InRank, ReLoRA, WeLore."""
